"""The optim and schedule groups, gradient clipping and the data order: the parts of a step that no loss test sees."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoTokenizer, SchedulerType

from adl_llm.batching import epoch_batches
from adl_llm.config import ScheduleName
from adl_llm.errors import ConfigError
from adl_llm.optim import check_optim_and_schedule, make_optimizer, make_scheduler, optimizer_class
from tests.conftest import compose_config
from tests.test_train import _adapter, _examples, _model, _train


def test_schedule_names_are_transformers_own():
    following_a_metric = {"reduce_lr_on_plateau", "greedy"}
    assert {s.value for s in ScheduleName} == {s.value for s in SchedulerType} - following_a_metric


def test_a_schedule_gets_its_own_arguments_or_a_clear_error():
    min_lr = ("schedule.name=cosine_with_min_lr", "+schedule.scheduler_specific_kwargs.min_lr_rate=0.5")
    assert _learning_rates(*min_lr)[-1] > 0.5 * 3e-5  # the floor it was given
    cfg = compose_config("schedule.name=warmup_stable_decay")  # needs num_decay_steps
    with pytest.raises(ConfigError, match=r"^schedule\.scheduler_specific_kwargs: warmup_stable_decay"):
        check_optim_and_schedule(cfg.optim, cfg.schedule)


def _learning_rates(*overrides: str, steps: int = 10) -> list[float]:
    cfg = compose_config(*overrides)
    optimizer = make_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(2))])
    scheduler = make_scheduler(cfg.schedule, optimizer, steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_warm_up_ramps_the_learning_rate_then_the_schedule_decays_it():
    rates = _learning_rates("schedule.warmup_ratio=0.3", "optim.lr=1.0")
    assert rates[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # ceil(0.3 x 10) = 3 warm-up steps
    assert all(a > b for a, b in itertools.pairwise(rates[3:]))  # linear decay after the peak
    absolute = _learning_rates("schedule.warmup_steps=2", "schedule.warmup_ratio=0.3", "optim.lr=1.0")
    assert absolute[:3] == pytest.approx([0.0, 0.5, 1.0])  # an absolute warm-up wins over the ratio
    constant = _learning_rates("schedule=constant", "schedule.warmup_steps=2", "optim.lr=1.0")
    assert constant == pytest.approx([0.0, 0.5] + [1.0] * 8)


def test_constant_without_warm_up_refuses_a_warm_up():
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        compose_config("schedule.name=constant", "schedule.warmup_ratio=0.1")


def test_the_optimiser_group_is_open_to_any_optimiser_and_its_own_arguments():
    sgd = compose_config("optim=sgd", "optim.momentum=0.5").optim
    optimizer = make_optimizer(sgd, [torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.5
    adamw = make_optimizer(compose_config().optim, [torch.nn.Parameter(torch.zeros(2))])
    assert adamw.defaults["betas"] == (0.9, 0.999) and adamw.defaults["lr"] == 3e-5
    assert optimizer_class(compose_config("optim=paged_adamw_8bit").optim).__name__ == "PagedAdamW8bit"


@pytest.mark.parametrize(
    "override,message",
    [
        ("+optim.momentum=0.9", "optim.momentum: AdamW takes no argument momentum"),
        (
            "+optim.weight_decy=0.1",
            "optim.weight_decy: AdamW takes no argument weight_decy (did you mean optim.weight_decay?)",
        ),
        ("optim._target_=torch.optim.Adamw", "optim._target_: cannot import torch.optim.Adamw"),
        ("optim._target_=collections.OrderedDict", "optim._target_: collections.OrderedDict is not a torch optimiser"),
    ],
)
def test_a_wrong_optimiser_or_argument_names_its_key(override, message):
    with pytest.raises(ConfigError) as info:
        optimizer_class(compose_config(override).optim)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("lr", ["inf", "nan", "-1", "0", "abc"])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused(lr):
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be"):
        compose_config(f"optim.lr={lr}")


def test_gradient_clipping_bounds_the_update(tiny_model_dir, tmp_path):
    """One plain SGD step of lr 1 moves the adapter by exactly the clipped gradient's norm."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = _examples(tokenizer, 4)
    moved = {}
    for max_norm in (1e-3, 0):
        model = _model(tiny_model_dir, lora_dropout=0.0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
                param.data.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
        before = _adapter(model)
        settings = ("optim=sgd", "optim.momentum=0.0", "optim.lr=1.0", "schedule=constant", "train.batch_size=4")
        _train(model, examples, tmp_path / str(max_norm), *settings, f"train.max_grad_norm={max_norm}")
        moved[max_norm] = torch.cat([(v - before[n]).flatten() for n, v in _adapter(model).items()]).norm()
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moved[0] > 20 * moved[1e-3]  # the unclipped gradient is far larger: the clip did the bounding


def test_each_epoch_has_its_own_replayable_order():
    epochs = [epoch_batches(100, 16, seed=0, epoch=e) for e in range(3)]
    for batches in epochs:
        assert sorted(i for step in batches for i in step) == list(range(100)) and len(batches) == 7
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epoch_batches(100, 16, seed=0, epoch=1) == epochs[1]  # a resumed run replays the same steps
    assert epoch_batches(100, 16, seed=1, epoch=0) != epochs[0]
