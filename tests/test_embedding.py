"""Embedding real tiles read from a real slide: contract, order, resume, empty stores, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from histopipe.embedding import EmbeddingConfig, embed_tiles, read_embeddings
from histopipe.encoders import get_encoder, sha256_file
from histopipe.encoders.efficientnet import package_weights
from histopipe.errors import ConfigError
from histopipe.pyramid import write_pyramid
from histopipe.tiling import TileSource, TileStore, TilingConfig, tile_slide, write_tile_store
from tests.helpers import run_cli

N_TILES = 25  # 5 × 5 grid of 256-px tiles at 0.5 µm/px


@pytest.fixture(scope="module")
def tiles(cmu_image, tmp_path_factory):
    """Tile store over a pyramidal TIFF cut from the real slide: background on the left
    third, skin tissue on the right (every grid tile kept, with its tissue fraction)."""
    folder = tmp_path_factory.mktemp("embed")
    slide = write_pyramid(folder / "cmu_crop.tif", cmu_image[768 : 768 + 1536, 0:1536], mpp=0.499, levels=(1, 4))
    out = folder / "tiles.zarr"
    tile_slide(slide, out, "cmu_crop", TilingConfig(mpp=0.5, tile_size=256, min_tissue=0.0))
    assert len(TileStore(out)) == N_TILES
    return out


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("efficientnet_lite0")


@pytest.fixture(scope="module")
def embedded(tiles, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "cmu_crop.zarr"
    result = embed_tiles(tiles, out, EmbeddingConfig(batch_size=8, num_workers=2), encoder=encoder, progress=False)
    assert not result.skipped and result.n_tiles == N_TILES
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_tissue_and_background_embeddings_differ(embedded, tiles):
    features, _, _ = read_embeddings(embedded)
    fraction = TileStore(tiles).tissue_fraction
    tissue, background = features[fraction > 0.9].astype(np.float32), features[fraction == 0].astype(np.float32)
    assert len(tissue) >= 4 and len(background) >= 8
    centres = _unit(np.stack([tissue.mean(0), background.mean(0)]))
    # Every tile is nearer (cosine) to its own group's centre than to the other's...
    assert (np.argmax(_unit(tissue) @ centres.T, axis=1) == 0).all()
    assert (np.argmax(_unit(background) @ centres.T, axis=1) == 1).all()
    # ...and the two centres point clearly apart (same-group tiles agree far more).
    assert centres[0] @ centres[1] < 0.6
    assert (_unit(background) @ _unit(background).T).mean() > (_unit(background) @ _unit(tissue).T).mean() + 0.2


def test_store_follows_the_contract(embedded, tiles):
    features, coords, attrs = read_embeddings(embedded)
    assert features.shape == (N_TILES, 1280) and features.dtype == np.float16
    assert coords.dtype == np.int64 and np.array_equal(coords, TileStore(tiles).coords)
    assert attrs["encoder"] == "efficientnet_lite0" and attrs["dim"] == 1280 and attrs["input_size"] == 224
    assert attrs["weights_sha256"] == sha256_file(package_weights())
    assert attrs["dtype"] == "float16" and attrs["n_tiles"] == N_TILES
    assert attrs["tiling"] == "mpp0.5_px256" and attrs["slide_id"] == "cmu_crop"
    assert np.isfinite(features).all()


def test_rows_follow_tile_order_whatever_the_workers(embedded, tiles, encoder, tmp_path):
    out = tmp_path / "serial.zarr"
    embed_tiles(tiles, out, EmbeddingConfig(batch_size=8, num_workers=0), encoder=encoder, progress=False)
    parallel, _, _ = read_embeddings(embedded)
    serial, _, _ = read_embeddings(out)
    assert np.array_equal(parallel, serial)
    # Row i is the tile at coords[i]: embed two tiles directly and compare.
    source = TileSource(tiles)
    rows = [0, N_TILES - 1]
    direct = encoder.embed(np.stack([source[i] for i in rows])).numpy()
    np.testing.assert_allclose(parallel[rows].astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    assert not np.allclose(direct[0], direct[1], atol=1e-2)


def test_existing_result_is_kept_and_force_or_new_settings_recompute(tiles, encoder, tmp_path):
    out = tmp_path / "resume.zarr"
    cfg = EmbeddingConfig(batch_size=16, num_workers=0)
    embed_tiles(tiles, out, cfg, encoder=encoder, progress=False)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    again = embed_tiles(tiles, out, cfg, encoder=encoder, progress=False)
    assert again.skipped and (out / "zarr.json").stat().st_mtime_ns == stamp
    forced = embed_tiles(tiles, out, cfg, encoder=encoder, force=True, progress=False)
    assert not forced.skipped and (out / "zarr.json").stat().st_mtime_ns != stamp
    wider = embed_tiles(tiles, out, EmbeddingConfig(batch_size=16, num_workers=0, dtype="float32"), encoder=encoder, progress=False)
    assert not wider.skipped
    features, _, attrs = read_embeddings(out)
    assert features.dtype == np.float32 and attrs["dtype"] == "float32"


def test_empty_tile_store_gives_an_empty_embedding_store(tmp_path):
    tiles = tmp_path / "empty.zarr"
    write_tile_store(tiles, np.zeros((0, 2), np.int64), np.zeros(0, np.float32),
                     {"slide_id": "blank", "tiling": "mpp0.5_px256", "tile_size": 256, "n_tiles": 0, "status": "empty"})
    out = tmp_path / "blank.zarr"
    result = embed_tiles(tiles, out, EmbeddingConfig(num_workers=0), progress=False)
    features, coords, attrs = read_embeddings(out)
    assert result.n_tiles == 0 and features.shape == (0, 1280) and coords.shape == (0, 2)
    assert attrs["n_tiles"] == 0 and attrs["tile_status"] == "empty" and attrs["encoder"] == "efficientnet_lite0"
    assert embed_tiles(tiles, out, EmbeddingConfig(num_workers=0), progress=False).skipped


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="embedding.batch_size"):
        EmbeddingConfig(batch_size=0)
    with pytest.raises(ConfigError, match="embedding.dtype"):
        EmbeddingConfig(dtype="int8")


@pytest.mark.slow
def test_cli_embeds_lists_and_explains_missing_weights(tiles, tmp_path, monkeypatch):
    out = tmp_path / "cli.zarr"
    cfg = json.dumps({"embedding": {"batch_size": 8, "dtype": "float32"}})
    r = run_cli("embed", tiles, out, "--config-json", cfg, "--batch-size", "16", "--num-workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"{N_TILES} tiles -> 1280-dim efficientnet_lite0" in r.stdout
    root = zarr.open_group(str(out), mode="r")
    assert root["features"].shape == (N_TILES, 1280) and root["features"].dtype == np.float32

    listing = run_cli("encoders")
    assert listing.returncode == 0
    for name in ("efficientnet_lite0", "uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "prov-gigapath", "timm:<architecture>"):
        assert name in listing.stdout

    monkeypatch.setenv("HISTOPIPE_WEIGHTS_DIR", str(tmp_path / "weights"))
    r = run_cli("embed", tiles, tmp_path / "uni.zarr", "--encoder", "uni")
    assert r.returncode == 2
    assert "MahmoodLab/UNI" in r.stderr and "pytorch_model.bin" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "uni.zarr").exists()
