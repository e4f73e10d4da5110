"""Every option of every group composes; bad values, keys, types and options get one clear line."""

from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from adl_llm.config import (
    PROJECT_ROOT,
    EvalConfig,
    ExportConfig,
    GenConfig,
    LoraConfig,
    ModelConfig,
    PromptConfig,
    Quant,
    ScheduleConfig,
    TaskConfig,
    TaskName,
    TrainConfig,
)
from adl_llm.errors import ConfigError, one_line_error
from tests.conftest import compose_config, run_entrypoint

GROUPS = ["model", "lora", "optim", "schedule", "gen", "data", "prompt", "task", "export", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (PROJECT_ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_of_every_group_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg.model.name_or_path


def test_every_group_has_options():
    assert all(_options(group) for group in GROUPS)


def test_defaults_are_the_seed_reports_settings():
    cfg = compose_config()
    assert cfg.model.name_or_path == "embedded:gemma3-270m" and cfg.model.quant is Quant.nf4
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (64, 16, 0.1)
    assert cfg.optim.lr == 3e-5 and cfg.schedule.name.value == "linear"
    assert (cfg.gen.beams, cfg.gen.top_p, cfg.gen.top_k, cfg.gen.temperature) == (3, 0.9, 10, 1.2)
    assert cfg.data.n_train == 3000 and cfg.eval.max_length == 2048
    assert cfg.prompt.n_shots == 0 and compose_config("prompt=few_shot").prompt.n_shots == 3
    assert cfg.task.name is TaskName.pipeline and cfg.adapter is None
    assert cfg.data.train_file == str(PROJECT_ROOT / "data" / "classical_zh" / "train.json")


@pytest.mark.parametrize(
    "override,key",
    [
        ("gen.beams=0", "gen.beams"),
        ("gen.top_p=1.5", "gen.top_p"),
        ("gen.top_p=0", "gen.top_p"),
        ("gen.temperature=0", "gen.temperature"),
        ("lora.r=0", "lora.r"),
        ("lora.lora_dropout=1.0", "lora.lora_dropout"),
        ("optim.lr=-1", "optim.lr"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("data.n_train=0", "data.n_train"),
        ("prompt.n_shots=-1", "prompt.n_shots"),
        ("prompt.query_template=no-placeholder", "prompt.query_template"),
        ("export.dtype=auto", "export.dtype"),
        ("train.compile_mode=fast", "train.compile_mode"),
    ],
)
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        compose_config(override)
    assert info.value.key == key
    assert one_line_error(info.value).startswith(key)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("lora.r=abc", "lora.r"),
        ("lora.rank=3", "lora.rank: unknown key (did you mean lora.r?)"),
        ("model.quant=nf8", "model.quant"),
        ("gen=beam7", "gen=beam7: unknown option; choose one of: beam3, beam5, greedy, report, sampling"),
        ("+gen.beam=3", "gen.beam: unknown key (did you mean gen.beams?)"),
    ],
)
def test_composition_errors_become_one_line(override, expected):
    with pytest.raises((HydraException, OmegaConfBaseException, ConfigError)) as info:
        compose_config(override)
    message = one_line_error(info.value)
    assert message is not None and "\n" not in message
    assert message.startswith(expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,needle",
    [
        ("gen.beams=0", "gen.beams"),
        ("lora.r=abc", "lora.r"),
        ("gen.top_p=1.5", "gen.top_p"),
        ("gen=beam7", "gen"),
    ],
)
def test_entrypoint_refuses_bad_config_with_one_line(override, needle, tmp_path):
    result = run_entrypoint("task=eval", override, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"adl-llm: error: {needle}")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_cfg_job_shows_every_group():
    result = run_entrypoint("--cfg", "job")
    assert result.returncode == 0, result.stderr
    top_level = {line.split(":")[0] for line in result.stdout.splitlines() if line and not line[0].isspace()}
    assert {
        "model",
        "lora",
        "optim",
        "schedule",
        "gen",
        "data",
        "prompt",
        "task",
        "eval",
        "export",
        "adapter",
    } <= top_level


def test_the_dataclasses_defaults_are_the_conf_files_defaults():
    """One source: a schema built in code reads its defaults from its group's default option in conf/."""
    cfg = compose_config()
    schemas = (
        ModelConfig,
        LoraConfig,
        ScheduleConfig,
        GenConfig,
        PromptConfig,
        TaskConfig,
        EvalConfig,
        TrainConfig,
        ExportConfig,
    )
    composed = (cfg.model, cfg.lora, cfg.schedule, cfg.gen, cfg.prompt, cfg.task, cfg.eval, cfg.train, cfg.export)
    for schema, group in zip(schemas, composed):
        assert schema() == group, schema.__name__


@pytest.mark.parametrize(
    "option,schema", [("train/default", TrainConfig), ("eval/default", EvalConfig), ("export/default", ExportConfig)]
)
def test_every_train_and_eval_key_is_in_conf_with_its_trade_off(option, schema):
    lines = (PROJECT_ROOT / "conf" / f"{option}.yaml").read_text(encoding="utf-8").splitlines()
    for name in (f.name for f in dataclasses.fields(schema)):
        [at] = [i for i, line in enumerate(lines) if line.startswith(f"{name}:")]
        assert "  # " in lines[at] or lines[at - 1].startswith("# "), f"{option}.yaml: {name} has no comment"


def test_a_key_missing_from_conf_is_an_error_at_import(tmp_path, monkeypatch):
    from adl_llm import conf_files

    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "default.yaml").write_text("shown: 1\n")
    monkeypatch.setattr(conf_files, "CONF_DIR", tmp_path)
    with pytest.raises(KeyError, match=r"conf/group/default\.yaml: no value for hidden"):

        @dataclasses.dataclass
        @conf_files.defaults_from("group/default")
        class Schema:
            shown: int
            hidden: int
