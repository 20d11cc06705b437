"""Building blocks of uptraining: module selection, LoRA merge, teacher weight sharing, losses, batch order."""

import json

import pytest
import torch
from conftest import tiny_model
from uptrain_fixtures import tiny_cla_checkpoint  # noqa: F401

from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout
from clakit.errors import ClakitError
from clakit.uptrain.distill import hidden_mse, kl_loss, share_frozen_weights, unique_bytes
from clakit.uptrain.packing import BatchOrder, blocks
from clakit.uptrain.recipe import LoraSection
from clakit.uptrain.student import make_trainable, merged, select_linear, trainable_names


def cla2(seed: int = 0):
    return cla_model_from(tiny_model("llama", seed=seed), uniform_layout(4, 2), "mean")


def test_role_prefixes_select_producer_and_consumer_layers():
    model = cla2()
    assert select_linear(model, ["k_proj"], "x") == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.2.self_attn.k_proj",
    ]
    assert select_linear(model, ["consumers.q_proj"], "x") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.3.self_attn.q_proj",
    ]
    assert select_linear(model, ["model.layers.[23].mlp.*_proj"], "x")[0] == "model.layers.2.mlp.gate_proj"
    with pytest.raises(ClakitError, match="'consumers.k_proj' matches no linear module"):
        select_linear(model, ["consumers.k_proj"], "lora.full_train")


def test_lora_and_full_train_make_exactly_the_chosen_tensors_trainable():
    lora = LoraSection(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], full_train=["k_proj", "consumers.q_proj"]
    )
    names = trainable_names(make_trainable(cla2(), lora))
    full = [n for n in names if "lora_" not in n]
    assert sorted(full) == sorted(
        [f"base_model.model.model.layers.{i}.self_attn.k_proj.weight" for i in (0, 2)]
        + [f"base_model.model.model.layers.{i}.self_attn.q_proj.weight" for i in (1, 3)]
    )
    # LoRA on every o_proj and on the producers' q_proj only (the consumers' q_proj train in full instead)
    lora_layers = sorted({n.split(".self_attn.")[1][:6] + n.split(".layers.")[1][0] for n in names if "lora_A" in n})
    assert lora_layers == ["o_proj0", "o_proj1", "o_proj2", "o_proj3", "q_proj0", "q_proj2"]


def test_merged_model_computes_what_the_adapted_model_computed():
    model = make_trainable(cla2(), LoraSection(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters do something
                p.normal_(0, 0.5)
    ids = torch.randint(0, 300, (2, 16))
    model.eval()
    before = model(input_ids=ids).logits
    plain = merged(model)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_teacher_shares_every_frozen_tensor_the_student_did_not_change():
    source = tiny_model("llama")
    student = make_trainable(
        cla_model_from(source, uniform_layout(4, 2), "mean"),
        LoraSection(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], full_train=["consumers.q_proj"]),
    )
    alone = unique_bytes(student)
    teacher = tiny_model("llama")  # a fresh copy of the original, as loaded from disk
    ids = torch.randint(0, 300, (1, 12))
    expected = teacher(input_ids=ids).logits
    shared = share_frozen_weights(teacher, student)
    # the teacher keeps its own: every layer's K/V (the student's are merged or absent), the trained q_proj
    own = {n for n, p in teacher.named_parameters() if all(p is not s for s in student.parameters())}
    kv = {f"model.layers.{i}.self_attn.{k}.weight" for i in range(4) for k in ("k_proj", "v_proj")}
    assert own == kv | {f"model.layers.{i}.self_attn.q_proj.weight" for i in (1, 3)}
    assert shared == len(list(teacher.named_parameters(remove_duplicate=False))) - len(own)
    extra = unique_bytes(student, teacher) - alone
    assert extra == sum(p.numel() * p.element_size() for n, p in teacher.named_parameters() if n in own)
    torch.testing.assert_close(teacher(input_ids=ids).logits, expected)  # still the original model


def test_kl_loss_is_zero_for_equal_logits_and_matches_the_definition():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert kl_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    temp = 2.0
    p = torch.softmax(t / temp, -1)
    manual = (p * (p.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert kl_loss(s, t, temp).item() == pytest.approx(manual.item(), rel=1e-5)
    assert hidden_mse([s, s], [s, s]).item() == 0.0 and hidden_mse([s, s], [s, t]).item() > 0


def test_batch_order_is_deterministic_disjoint_over_processes_and_covers_an_epoch():
    n, bs = 10, 2
    assert [BatchOrder(n, bs, 3).indices(g) for g in range(7)] == [BatchOrder(n, bs, 3).indices(g) for g in range(7)]
    epoch = sum((BatchOrder(n, bs, 3).indices(g) for g in range(5)), [])
    assert sorted(epoch) == list(range(n))
    ranks = [BatchOrder(n, 1, 3, rank=r, world=2) for r in (0, 1)]
    two = sum(([ranks[0].indices(g)[0], ranks[1].indices(g)[0]] for g in range(5)), [])
    assert sorted(two) == list(range(n)) and two == epoch  # 2 processes x batch 1 == 1 process x batch 2
    second = sum((BatchOrder(n, bs, 3).indices(g) for g in range(5, 10)), [])
    assert sorted(second) == list(range(n)) and second != epoch  # the next epoch: all blocks again, reshuffled
    assert blocks(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_the_original_of_a_converted_checkpoint_is_read_from_its_conversion_record(tiny_llama_checkpoint, tmp_path):
    from clakit.convert import convert
    from clakit.uptrain.recipe import ModelSection
    from clakit.uptrain.student import original_spec

    out = convert(str(tiny_llama_checkpoint), tmp_path / "cla", factor=2, quiet=True)
    assert original_spec(ModelSection(path=str(out))) == str(tiny_llama_checkpoint)
    assert original_spec(ModelSection(path=str(out), original="elsewhere")) == "elsewhere"
    (out / "clakit_convert.json").unlink()
    assert original_spec(ModelSection(path=str(out))) is None


def test_seq_len_is_checked_against_the_context_window_the_config_states(tiny_cla_checkpoint, tmp_path):  # noqa: F811
    """Up to max_position_embeddings (256) is accepted; a config.json without it gets transformers' class default
    (2048), as in convert and eval (tests/test_context_window.py)."""
    from clakit.uptrain.recipe import ModelSection
    from clakit.uptrain.student import check_model_section

    check_model_section(ModelSection(path=str(tiny_cla_checkpoint)), 256)
    with pytest.raises(ClakitError, match=r"data.seq_len 257 exceeds .* \(max_position_embeddings 256\); use at most"):
        check_model_section(ModelSection(path=str(tiny_cla_checkpoint)), 257)
    config = json.loads((tiny_cla_checkpoint / "config.json").read_text())
    del config["max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_model_section(ModelSection(path=str(tmp_path)), 2048)


def test_fsdp1_mixed_precision_keeps_buffers_in_fp32():
    """accelerate's FSDP1 bf16 policy casts buffers too: RoPE's inv_freq was rounded in the student (not in the
    teacher or the saved checkpoint). fp32_buffers keeps them fp32 and leaves parameters and reductions bf16."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from clakit.uptrain.pipeline import fp32_buffers

    for version in (1, 2):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
        plugin.set_mixed_precision("bf16")
        acc = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
        fp32_buffers(acc)
        policy = plugin.mixed_precision_policy
        assert policy.param_dtype == policy.reduce_dtype == torch.bfloat16
        assert getattr(policy, "buffer_dtype", torch.float32) == torch.float32


def test_processes_wait_in_collectives_longer_than_the_main_process_works_alone(tmp_path):
    """accelerate's NCCL default is 10 minutes, shorter than the main process reading a 70B alone (rank-0 loading)
    or writing the merged result while the others wait: the run died at the first big checkpoint."""
    import datetime

    from clakit.uptrain.pipeline import make_accelerator
    from clakit.uptrain.recipe import TrainSection

    acc = make_accelerator(TrainSection(output_dir=str(tmp_path / "run")), tmp_path)
    assert acc.init_handler.timeout >= datetime.timedelta(hours=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_optimizer_is_fused_adamw_and_steps_as_the_per_tensor_loop_does(dtype):
    """CPU tensors got torch's per-tensor AdamW loop (torch picks foreach or fused only for CUDA): 5.9x slower over
    the CPU recipe's 26M trained parameters. make_optimizer asks for the fused kernel (transformers' default
    optimizer), which makes the same update within rounding."""
    from clakit.uptrain.recipe import TrainSection
    from clakit.uptrain.trainer import make_optimizer

    train = TrainSection(learning_rate=1e-2, weight_decay=0.1)
    fused, loop = (torch.nn.Linear(16, 8).to(dtype) for _ in range(2))
    loop.load_state_dict(fused.state_dict())
    optimizers = make_optimizer(fused, train), torch.optim.AdamW(loop.parameters(), lr=1e-2, weight_decay=0.1)
    assert optimizers[0].defaults["fused"] is True
    for step in range(5):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step)).to(dtype)
        for model, optimizer in zip((fused, loop), optimizers, strict=True):
            model(x).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.weight.float(), loop.weight.float(), atol=tolerance, rtol=tolerance)


def test_a_checkpoint_of_the_per_tensor_loop_resumes_on_the_fused_kernel(tmp_path):
    """A checkpoint saved before the optimizer was fused holds param_groups with fused=None; loading them over the
    fused optimizer kept fused=None, so a resumed run stayed on the slow loop. The run's kernel is kept now, and the
    moments and step still come from the checkpoint."""
    from clakit.uptrain import checkpoint
    from clakit.uptrain.recipe import TrainSection
    from clakit.uptrain.trainer import make_optimizer

    def parts(fused: bool):
        model = torch.nn.Linear(8, 4)
        model.load_state_dict({"weight": torch.ones(4, 8), "bias": torch.zeros(4)})
        optimizer = (
            make_optimizer(model, TrainSection(learning_rate=1e-2))
            if fused
            else torch.optim.AdamW(model.parameters(), lr=1e-2)
        )
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    old, old_optimizer, old_scheduler = parts(fused=False)
    old(torch.ones(2, 8)).sum().backward()
    old_optimizer.step()
    saved = checkpoint.save_checkpoint(tmp_path / "run", 1, old, old_optimizer, old_scheduler, {"step": 1})
    assert torch.load(saved / "optimizer.pt")["param_groups"][0]["fused"] is None
    new, optimizer, scheduler = parts(fused=True)
    checkpoint.load_checkpoint(saved, new, optimizer, scheduler)
    assert [g["fused"] for g in optimizer.param_groups] == [True]
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    torch.testing.assert_close(state["exp_avg"], old_optimizer.state[old.weight]["exp_avg"])


@pytest.mark.parametrize("failing", ["trainable", "scheduler"])
def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_and_keeps_the_last(failing, tmp_path, monkeypatch):
    """A full disk while saving step 2 (safetensors' OSError, or torch.save's RuntimeError for the scheduler): one
    ClakitError naming the checkpoint, the error and --resume from step 1; the unfinished step-000002.tmp is gone
    and step 1 loads as before."""
    from clakit.uptrain import checkpoint

    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    first = checkpoint.save_checkpoint(tmp_path / "run", 1, model, optimizer, scheduler, {"step": 1})

    def full(*args, **kwargs):
        raise (OSError(28, "No space left on device") if failing == "trainable" else RuntimeError("file write failed"))

    if failing == "trainable":
        monkeypatch.setattr(checkpoint, "save_file", full)
    else:
        save = torch.save

        def scheduler_fails(obj, path, *args, **kwargs):
            return full() if path.name == "scheduler.pt" else save(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", scheduler_fails)
    with pytest.raises(ClakitError) as e:
        checkpoint.save_checkpoint(tmp_path / "run", 2, model, optimizer, scheduler, {"step": 2})
    message = str(e.value)
    assert message.startswith(f"could not write checkpoint step-000002 in {tmp_path / 'run' / 'checkpoints'}: ")
    assert ("No space left on device" if failing == "trainable" else "file write failed") in message
    assert message.endswith("then add --resume to the same command to continue from step-000001")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000001"]
    assert checkpoint.checkpoint_dirs(tmp_path / "run") == [first]
    assert checkpoint.load_checkpoint(first, model, optimizer, scheduler) == {"step": 1}


@pytest.mark.parametrize("name", ["m.gguf", "M.GGUF", "model"])
def test_a_gguf_source_is_priced_in_float32_whatever_its_name(tmp_path, name):
    """The run's disk check counts a GGUF's conversion in fp32 (it is dequantised to fp32). It tested the suffix
    `.gguf` where the source's kind was meant: `M.GGUF` or a GGUF without a suffix (both read as GGUF) were priced
    by their config's dtype, a bfloat16 config at half what the conversion writes."""
    from types import SimpleNamespace

    from clakit.sources import Source
    from clakit.uptrain.pipeline import _conversion_bytes

    (tmp_path / name).write_bytes(b"GGUF")
    skeleton = torch.nn.Linear(8, 8, bias=False)
    source = Source(name, "gguf", tmp_path / name)
    assert _conversion_bytes(skeleton, None, source, SimpleNamespace(dtype="bfloat16")) == 8 * 8 * 4
