from pathlib import Path

import pytest

from histopipe.config import load_config, load_configs, section
from histopipe.errors import ConfigError
from histopipe.sheet import read_sheet
from histopipe.tiling import TilingConfig


def test_defaults_filled_for_every_section():
    cfg = load_config(None)
    assert cfg["tiling"] == {"mpp": 0.5, "tile_size": 256, "overlap": 0, "min_tissue": 0.25, "mpp_tolerance": 0.05,
                             "min_sharpness": 500.0, "blur_mpp": 2.0, "blur_action": "flag"}
    assert cfg["tissue"]["mask_mpp"] == 8.0
    assert section(cfg, "tiling", TilingConfig).id == "mpp0.5_px256"


def test_schema_keys_all_have_description_and_default():
    from histopipe.config import CONFIG_SCHEMA, load_schema

    def walk(props, where):
        for key, sub in props.items():
            assert "description" in sub, f"{where}.{key} has no description"
            assert "default" in sub, f"{where}.{key} has no default"
            if sub.get("type") == "object" and "properties" in sub:
                walk(sub["properties"], f"{where}.{key}")

    walk(load_schema(CONFIG_SCHEMA)["properties"], "config")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"tiling": {"mpp": -1}}, "tiling.mpp"),
        ({"tiling": {"tile_size": 3}}, "tiling.tile_size"),
        ({"on_error": "ignore"}, "on_error"),
        ({"tiling": {"bogus": 1}}, "bogus"),
    ],
)
def test_bad_config_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, override)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_several_config_files_merge_in_order_like_snakemake_configfiles(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("tiling: {mpp: 1.0, tile_size: 128}\nldm: {batch_size: 8}\n")
    b.write_text("tiling: {tile_size: 64}\n")
    cfg = load_configs([a, b], {"ldm": {"lr": 0.5}})
    assert cfg["tiling"]["mpp"] == 1.0 and cfg["tiling"]["tile_size"] == 64  # later file wins key by key
    assert cfg["ldm"]["batch_size"] == 8 and cfg["ldm"]["lr"] == 0.5
    assert cfg["tiling"]["overlap"] == 0  # defaults filled
    b.write_text("tiling: {tile_size: -1}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml \+ .*b\.yaml: tiling\.tile_size"):
        load_configs([a, b])
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_configs([a, tmp_path / "nope.yaml"])


def _sheet(tmp_path: Path, rows: list[str]) -> Path:
    p = tmp_path / "slides.tsv"
    p.write_text("slide_id\tpath\tmpp\n" + "\n".join(rows) + "\n")
    return p


def test_sheet_resolves_paths_relative_to_sheet(tmp_path, cmu_slide):
    (tmp_path / "a.svs").symlink_to(cmu_slide)
    entries = read_sheet(_sheet(tmp_path, ["s1\ta.svs\t", "s2\ta.svs\t0.25"]))
    assert [e.slide_id for e in entries] == ["s1", "s2"]
    assert entries[0].path == (tmp_path / "a.svs").resolve()
    assert entries[0].mpp is None and entries[1].mpp == 0.25


@pytest.mark.parametrize(
    "rows, fragment",
    [
        (["s1\tmissing.svs\t"], "s1.*file not found"),
        (["s1\ta.svs\t", "s1\ta.svs\t"], "duplicate slide_id 's1'"),
        (["s1\ta.svs\tabc"], "mpp 'abc' is not a number"),
        (["s1\ta.svs\t-2"], "s1"),
        (["bad id\ta.svs\t"], "bad id"),
        (["s1\tempty.svs\t"], "file is empty"),
    ],
)
def test_sheet_errors_name_slide_and_problem(tmp_path, cmu_slide, rows, fragment):
    (tmp_path / "a.svs").symlink_to(cmu_slide)
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(ConfigError, match=fragment):
        read_sheet(_sheet(tmp_path, rows))


def test_sheet_missing_columns(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("id\tfile\nx\ty\n")
    with pytest.raises(ConfigError, match="missing column"):
        read_sheet(p)
