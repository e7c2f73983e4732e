"""Students made of several networks: the plan as data, one artifact, one loader. A two-expert LoRA student on the
shipped digits-sd pipeline samples the same images through stock Diffusers calls only (adapters switched in
``callback_on_step_end``), through ``load_student`` and through the Denoiser loop; routed plans keep input order;
recipes written before plans existed still load."""

import json

import pytest
import torch

from stepdistill.errors import UsageError
from stepdistill.pipelines.plan import Route, Router, SamplingRecipe, Segment, passes

PROMPTS = ["a handwritten digit seven", "the number 3", "a handwritten digit zero"]
SEEDS = [5, 6, 7]


def two_experts() -> SamplingRecipe:
    return SamplingRecipe(scheduler="LCMScheduler", timesteps=[999, 749, 499, 249], guidance_scale=1.0,
                          segments=[Segment(network="expert_0", timesteps=[999, 749]),
                                    Segment(network="expert_1", timesteps=[499, 249])])


def test_plan_is_data_and_round_trips(tmp_path):
    routed = SamplingRecipe(scheduler="LCMScheduler", timesteps=[999], router=Router(by="label", routes=[
        Route(labels=[0, 1, 2, 3, 4], segments=[Segment(network="a", timesteps=[999])]),
        Route(labels=[5, 6, 7, 8, 9], segments=[Segment(network="b", timesteps=[999])])]))
    for recipe in (two_experts(), routed):
        recipe.save(tmp_path)
        back = SamplingRecipe.load(tmp_path)
        assert back == recipe and json.loads((tmp_path / "sampling.json").read_text())["scheduler"] == "LCMScheduler"
    (p,) = passes(two_experts(), two_experts().segments)  # one scheduler: one pass, experts take turns
    assert p.networks == ("expert_0", "expert_0", "expert_1", "expert_1") and p.chain == (999, 749, 499, 249)
    assert routed.router.route(labels=torch.tensor([7, 2, 5])).tolist() == [1, 0, 1]
    with pytest.raises(UsageError, match="no student owns"):
        routed.router.route(labels=torch.tensor([11]))
    with pytest.raises(ValueError, match="two routes"):
        Router(by="label", routes=[Route(labels=[1], segments=[Segment()]), Route(labels=[1], segments=[Segment()])])
    assert two_experts().steps == 4 and two_experts().label() == "LCM-4 2 segments"
    with pytest.raises(UsageError, match="fixes its timesteps"):
        two_experts().with_steps(2)


@pytest.fixture(scope="module")
def expert_student(tmp_path_factory):
    """Two random, non-zero LoRA experts on the digits-sd UNet, exported as one artifact with a 2-segment plan."""
    from types import SimpleNamespace

    from stepdistill import assets
    from stepdistill.config import ModelConfig
    from stepdistill.lora import add_lora
    from stepdistill.models import load_bundle
    from stepdistill.pipelines.artifact import export_student

    bundle = load_bundle(ModelConfig(pretrained="asset:digits-sd"))
    net = bundle.new_network(trainable=False)
    experts = {}
    for k in range(2):
        torch.manual_seed(10 + k)
        add_lora(net, f"expert_{k}", 4, init=False)
        experts[f"expert_{k}"] = SimpleNamespace(module=net, adapter=f"expert_{k}",
                                                 denoiser=bundle.denoiser(net, adapter=f"expert_{k}"))
    out = tmp_path_factory.mktemp("experts") / "student"
    export_student(bundle, experts, out, two_experts())
    return out, assets.path("digits-sd")


def test_two_experts_stock_diffusers_equals_load_student_and_denoiser_loop(expert_student):
    from diffusers import StableDiffusionPipeline

    from stepdistill.pipelines import load_student
    from stepdistill.pipelines.samplers import Conditions

    student_dir, base = expert_student
    recipe = SamplingRecipe.load(student_dir)
    assert sorted(recipe.networks) == ["expert_0", "expert_1"]
    assert (student_dir / "expert_0" / "pytorch_lora_weights.safetensors").exists()

    # stock Diffusers calls only (the README's lines)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for name, net in recipe.networks.items():
        pipe.load_lora_weights(student_dir / net.path, adapter_name=name)
    pipe.scheduler = recipe.scheduler_for(pipe)
    owner = [s.network for s in recipe.segments for _ in s.timesteps]  # which expert runs each step
    calls = []

    def switch(pipe, i, t, kwargs):
        calls.append((int(t), pipe.get_active_adapters()))
        if i + 1 < len(owner):
            pipe.set_adapters(owner[i + 1])
        return kwargs
    pipe.set_adapters(owner[0])
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    stock = pipe(PROMPTS, timesteps=recipe.timesteps, guidance_scale=1.0, generator=gens, output_type="pt",
                 callback_on_step_end=switch).images
    assert calls == [(999, ["expert_0"]), (749, ["expert_0"]), (499, ["expert_1"]), (249, ["expert_1"])]

    student = load_student(student_dir)
    ours = student(prompts=PROMPTS, seeds=SEEDS)
    assert (stock - ours).abs().max() <= 1e-4
    loop = student.sampler.denoiser_sampler()(recipe, Conditions(prompts=PROMPTS), SEEDS)  # pipelines.sample
    assert (stock - loop).abs().max() <= 1e-4
    # not vacuous: one expert throughout gives other images
    one = recipe.model_copy(update={"segments": [Segment(network="expert_0", timesteps=[999, 749, 499, 249])]})
    assert (student.sampler(one, Conditions(prompts=PROMPTS), SEEDS) - ours).abs().max() > 1e-3


def test_routed_plan_keeps_input_order(expert_student):
    """Each prompt's digit routes to an expert; shuffled conditions give the same images, permuted."""
    from stepdistill.data.prompts import prompt_to_digit
    from stepdistill.pipelines import load_student
    from stepdistill.pipelines.samplers import Conditions

    student_dir, _ = expert_student
    student = load_student(student_dir)
    one_step = lambda name: [Segment(network=name, timesteps=[999])]  # noqa: E731
    routed = SamplingRecipe(scheduler="LCMScheduler", timesteps=[999], router=Router(by="label", routes=[
        Route(labels=[0, 1, 2, 3, 4], segments=one_step("expert_0")),
        Route(labels=[5, 6, 7, 8, 9], segments=one_step("expert_1"))]))
    prompts = PROMPTS + ["the number 9"]
    labels = torch.tensor([prompt_to_digit(p) for p in prompts])
    seeds = [1, 2, 3, 4]
    x = student.sampler(routed, Conditions(labels, prompts), seeds)
    perm = [2, 0, 3, 1]
    y = student.sampler(routed, Conditions(labels[perm], [prompts[i] for i in perm]), [seeds[i] for i in perm])
    assert torch.allclose(y, x[perm], atol=1e-5)
    alone = student.sampler(routed.model_copy(update={"router": None, "segments": one_step("expert_1")}),
                            Conditions(labels[:1], prompts[:1]), seeds[:1])  # "seven" belongs to expert_1
    assert torch.allclose(x[:1], alone, atol=1e-5)
    # prompt routing: nearest centre of the pooled CLIP embedding, the same rule on any sampler
    emb = student.sampler.prompt_embeddings(prompts)
    by_prompt = routed.model_copy(update={"router": Router(by="prompt_embedding", routes=[
        Route(centre=emb[1].tolist(), segments=one_step("expert_0")),
        Route(centre=emb[0].tolist(), segments=one_step("expert_1"))])})
    assert by_prompt.router.route(embeddings=emb)[:2].tolist() == [1, 0]
    z = student.sampler(by_prompt, Conditions(None, prompts[:2]), seeds[:2])
    assert torch.allclose(z[0], x[0], atol=1e-5)
    assert torch.allclose(student.sampler.denoiser_sampler().prompt_embeddings(prompts), emb, atol=1e-5)


def test_old_single_network_recipe_loads(tmp_path):
    """sampling.json as exporters wrote it before plans existed (no networks / segments / router) + a LoRA in the
    folder: it loads as the one-segment plan of network 'student'."""
    from diffusers import UNet2DConditionModel

    from stepdistill import assets
    from stepdistill.lora import add_lora, save_diffusers_lora
    from stepdistill.pipelines import load_student

    student = tmp_path / "student"
    unet = UNet2DConditionModel.from_pretrained(assets.path("digits-sd"), subfolder="unet")
    torch.manual_seed(3)
    add_lora(unet, "student", 4, init=False)
    save_diffusers_lora(unet, "student", student)
    old = {"scheduler": "LCMScheduler", "scheduler_kwargs": {}, "num_inference_steps": 1, "timesteps": [399],
           "guidance_scale": 1.0, "eta": None, "format": "lora", "base": "asset:digits-sd",
           "prediction_type": "epsilon", "method": "dmd"}
    (student / "sampling.json").write_text(json.dumps(old, indent=2))
    loaded = load_student(student)
    assert list(loaded.recipe.network_table()) == ["student"] and loaded.recipe.plan_segments()[0].network is None
    x = loaded(prompts=PROMPTS[:2], seeds=[0, 1])
    assert x.shape == (2, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
