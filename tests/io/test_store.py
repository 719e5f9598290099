from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi_mil.io.store import PatchStore, StoreWriter, read_complete_attrs, store_path


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_store_roundtrip_and_atomic_publish(tmp_path, fmt) -> None:
    final = store_path(tmp_path, "s1", fmt)
    coords = np.array([[0, 0], [256, 0], [0, 256]], dtype=np.int64)
    w = StoreWriter(final, fmt)
    w.write_coords(coords, np.array([1.0, 0.6, 0.5], np.float32), {"patch_size": 256, "patch_level": 0, "downsample": [1.0, 1.0]})
    w.begin_patches()
    blobs = [b"\xff\xd8abc", b"\xff\xd8defgh", b"\xff\xd8i"]
    w.append_patches(np.frombuffer(b"".join(blobs[:2]), np.uint8), np.array([5, 7]))
    w.append_patches(np.frombuffer(blobs[2], np.uint8), np.array([3]))
    w.end_patches()
    w.set_attrs({"slide_id": "s1", "tissue_params": {"a": 1}, "mpp_source": "metadata"})
    assert not final.exists() and read_complete_attrs(final) is None  # nothing visible before commit
    w.commit()
    with PatchStore(final) as store:
        np.testing.assert_array_equal(store.coords, coords)
        assert [store.patch_jpeg(i) for i in range(3)] == blobs
        assert store.attrs["tissue_params"] == {"a": 1} and store.attrs["complete"] is True
        assert store.coords_attrs["patch_size"] == 256
    assert read_complete_attrs(final)["slide_id"] == "s1"


def test_aborted_store_leaves_nothing(tmp_path) -> None:
    final = store_path(tmp_path, "s2", "h5")
    w = StoreWriter(final, "h5")
    w.write_coords(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), {})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_hdf5_layout_is_clam_compatible(tmp_path) -> None:
    final = store_path(tmp_path, "s3", "h5")
    w = StoreWriter(final, "h5")
    w.write_coords(np.array([[10, 20]], np.int64), np.array([0.9], np.float32),
                   {"patch_size": 256, "patch_level": 1, "downsample": [4.0, 4.0], "name": "s3"})
    w.commit()
    with h5py.File(final, "r") as f:  # what CLAM's feature extraction reads
        assert f["coords"].shape == (1, 2) and f["coords"].dtype == np.int64
        assert f["coords"].attrs["patch_level"] == 1 and f["coords"].attrs["patch_size"] == 256
