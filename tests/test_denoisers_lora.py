"""The Denoiser interface (prediction types, CFG) and LoRA adapters (switching, export, stock loading)."""

import pytest
import torch

from stepdistill.denoisers import MLP, Cond, Denoiser
from stepdistill.errors import UsageError
from stepdistill.lora import (active_adapter, add_lora, load_peft_lora, lora_parameters, save_diffusers_lora,
                              save_peft_lora)
from stepdistill.schedules import NoiseSchedule


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                "beta_start": 0.00085, "beta_end": 0.012})


class Fixed(torch.nn.Module):
    """net(x, t, class_labels) = label-dependent constant output, to check CFG and conversions exactly."""

    def forward(self, x, t, class_labels=None):
        return torch.ones_like(x) * (class_labels.float()[:, None] + 1)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_agree(schedule, pred):
    torch.manual_seed(0)
    x0, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([5, 200, 600, 999])
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.target(x0, eps, t, pred)

    class Oracle(torch.nn.Module):
        def forward(self, x, tt):
            return target

    d = Denoiser(Oracle(), schedule, pred)
    assert torch.allclose(d.x0(x_t, t), x0, atol=1e-4)
    assert torch.allclose(d.eps(x_t, t), eps, atol=1e-3)
    x0b, epsb = d.x0_eps(x_t, t)
    assert torch.allclose(x0b, x0, atol=1e-4) and torch.allclose(epsb, eps, atol=1e-3)


def test_cfg_formula(schedule):
    d = Denoiser(Fixed(), schedule, "sample")
    cond = Cond({"class_labels": torch.tensor([2, 5])}, {"class_labels": torch.tensor([10, 10])})
    x = torch.zeros(2, 3)
    out = d.predict(x, 10, cond, guidance=3.0)
    c, u = torch.tensor([3.0, 6.0])[:, None], 11.0
    assert torch.allclose(out, u + 3.0 * (c - u))
    assert torch.allclose(d.predict(x, 10, cond, guidance=1.0), c.expand(2, 3))
    with pytest.raises(ValueError, match="unconditional"):
        d.predict(x, 10, Cond({"class_labels": torch.tensor([1, 2])}), guidance=2.0)


def test_named_adapters_share_one_frozen_base(schedule):
    torch.manual_seed(0)
    net = MLP(hidden=16, depth=1)
    net.requires_grad_(False)
    x, t = torch.randn(5, 2), torch.full((5,), 300)
    base = net(x, t).detach()
    add_lora(net, "student", rank=4, init=False)
    add_lora(net, "fake", rank=4, init=False)
    teacher = Denoiser(net, schedule, "epsilon", adapters_off=True)
    student = teacher.view(adapter="student", adapters_off=False)
    fake = teacher.view(adapter="fake", adapters_off=False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    out_t, out_s, out_f = teacher(x, t), student(x, t), fake(x, t)
    assert torch.allclose(out_t, base, atol=1e-6)  # adapters off == the untouched base
    assert not torch.allclose(out_s, base) and not torch.allclose(out_f, out_s)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags  # switching keeps grad flags
    # gradients from the student view reach only the student adapter
    student(x, t).sum().backward()
    assert all(p.grad is not None for p in lora_parameters(net, "student"))
    assert all(p.grad is None for p in lora_parameters(net, "fake"))
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)


def test_peft_lora_roundtrip_and_mismatch(tmp_path, schedule):
    torch.manual_seed(0)
    net = MLP(hidden=16, depth=1)
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    add_lora(net, "student", rank=4, alpha=8, init=False)
    x, t = torch.randn(3, 2), torch.full((3,), 100)
    with active_adapter(net, "student"):
        want = net(x, t)
    save_peft_lora(net, "student", tmp_path / "lora")
    fresh = MLP(hidden=16, depth=1)
    fresh.load_state_dict(base_state)
    load_peft_lora(fresh, tmp_path / "lora", name="student")
    with active_adapter(fresh, "student"):
        got = fresh(x, t)
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(UsageError, match="does not match the model"):
        load_peft_lora(MLP(hidden=24, depth=2), tmp_path / "lora")
    with pytest.raises(UsageError, match="not found"):
        load_peft_lora(MLP(), tmp_path / "missing")


def test_diffusers_lora_loads_in_stock_pipeline(tmp_path):
    """Export -> StableDiffusionPipeline.load_lora_weights -> identical UNet outputs (also after fuse_lora)."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.testing import tiny_sd_pipeline

    folder = tiny_sd_pipeline(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    unet = pipe.unet
    torch.manual_seed(1)
    add_lora(unet, "student", rank=4, alpha=2, init=False)  # alpha != rank: metadata must carry it
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 500])
    ehs = torch.randn(2, 16, 16)
    with torch.no_grad(), active_adapter(unet, "student"):
        want = unet(x, t, encoder_hidden_states=ehs).sample
    with torch.no_grad(), active_adapter(unet, None, all_off=True):
        base = unet(x, t, encoder_hidden_states=ehs).sample
    save_diffusers_lora(unet, "student", tmp_path / "student")
    stock = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    stock.load_lora_weights(tmp_path / "student")
    with torch.no_grad():
        got = stock.unet(x, t, encoder_hidden_states=ehs).sample
    assert (got - want).abs().max() <= 1e-5
    assert (base - want).abs().max() > 1e-3  # the adapter does something
    stock.fuse_lora()
    stock.unload_lora_weights()
    with torch.no_grad():
        fused = stock.unet(x, t, encoder_hidden_states=ehs).sample
    assert (fused - want).abs().max() <= 1e-4
