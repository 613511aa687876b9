"""Device and dtype policy and the fit plan (llama_lite.devices), driven without a GPU by patching
torch's device queries to look like a T4, an L4, an A100 40GB and an H100 80GB."""
import contextlib
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from conftest import run_llama_lite
from llama_lite import ModelArgs, Transformer
from llama_lite.devices import (CheckpointError, GiB, default_dtype, plan_fit, resolve_device, resolve_dtype,
                                weight_bytes)
from llama_lite.quantize import Int8Linear, model_bytes, quantize_model_int8

# name: (CUDA capability, total memory as torch reports it). The T4 is sold as 16 GB and shows
# 15 GiB; the CUDA context then takes some of that (0.4 GiB here) before anything is loaded.
GPUS = {
    "T4": ((7, 5), 15 * GiB),
    "L4": ((8, 9), int(24e9)),
    "A100-40GB": ((8, 0), int(40e9)),
    "H100-80GB": ((9, 0), int(80e9)),
}
CONTEXT_BYTES = int(0.4 * GiB)


@contextlib.contextmanager
def fake_gpu(name):
    capability, total = GPUS[name]
    free = total - CONTEXT_BYTES
    with contextlib.ExitStack() as stack:
        p = lambda attr, **kw: stack.enter_context(mock.patch.object(torch.cuda, attr, **kw))  # noqa: E731
        p("is_available", return_value=True)
        p("device_count", return_value=1)
        p("current_device", return_value=0)
        p("get_device_capability", return_value=capability)
        p("get_device_properties", return_value=SimpleNamespace(total_memory=total, name=name))
        p("mem_get_info", return_value=(free, total))
        p("get_device_name", return_value=name)
        # what torch says on a T4 by default (emulated bf16 counts): the policy must not ask it
        p("is_bf16_supported", side_effect=AssertionError("the dtype policy must not use is_bf16_supported"))
        yield free


def no_cuda_calls():
    """A CUDA query is a bug on mps/cpu paths: make each one fail loudly."""
    stack = contextlib.ExitStack()
    for attr in ("get_device_capability", "get_device_properties", "mem_get_info", "is_bf16_supported"):
        stack.enter_context(mock.patch.object(torch.cuda, attr, side_effect=AssertionError(f"torch.cuda.{attr} called")))
    return stack


SEVEN_B = ModelArgs.from_name("llama2-7b")


# -- dtype policy --------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu, expected", [("T4", torch.float16), ("L4", torch.bfloat16),
                                           ("A100-40GB", torch.bfloat16), ("H100-80GB", torch.bfloat16)])
def test_bf16_only_where_the_hardware_has_it(gpu, expected):
    with fake_gpu(gpu):
        assert resolve_dtype(None, resolve_device("cuda")) == expected
        assert resolve_dtype(None, "cuda:0") == expected


def test_cpu_is_float32_and_mps_float16_without_cuda_calls():
    with no_cuda_calls():
        assert resolve_dtype(None, "cpu") == torch.float32
        assert default_dtype("mps") == torch.float16
        with mock.patch.object(torch.backends.mps, "is_available", return_value=True):
            assert resolve_device("mps") == torch.device("mps")
            assert resolve_dtype(None, resolve_device("mps")) == torch.float16


@pytest.mark.parametrize("name, expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16), ("fp16", torch.float16),
    ("half", torch.float16), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("BF16", torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16)])
def test_dtype_names_and_torch_dtypes(name, expected):
    assert resolve_dtype(name, "cpu") == expected


@pytest.mark.parametrize("dtype", ["float64", torch.float64, "double", "fp64"])
def test_float64_is_accepted_as_a_name_and_as_a_torch_dtype(dtype):
    assert resolve_dtype(dtype, "cpu") == torch.float64


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, "int8", "float8", torch.complex64, 3])
def test_other_dtypes_are_refused_the_same_way(dtype):
    with pytest.raises(CheckpointError, match="choose one of float32, float16, bfloat16, float64"):
        resolve_dtype(dtype, "cpu")


# -- device validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("device, message", [
    ("cuda", "PyTorch sees no CUDA GPU"),
    ("cuda:0", "PyTorch sees no CUDA GPU"),
    ("mps", "only on a Mac"),
    ("meta", "shapes but no values"),
    ("gpu", "unknown device 'gpu'; choose cpu, cuda, cuda:N or mps"),
    ("xpu", "not supported here"),
])
def test_devices_this_machine_lacks_are_one_clear_error(device, message):
    with mock.patch.object(torch.cuda, "is_available", return_value=False), \
            mock.patch.object(torch.backends.mps, "is_available", return_value=False):
        with pytest.raises(CheckpointError, match=message):
            resolve_device(device)


def test_a_cuda_index_past_the_last_gpu_is_refused():
    with fake_gpu("T4"):
        assert resolve_device("cuda") == torch.device("cuda", 0)
        with pytest.raises(CheckpointError, match="sees 1 CUDA GPU"):
            resolve_device("cuda:1")


def test_loading_fails_on_the_device_before_reading_any_file(tmp_path):
    """No such checkpoint either: the device error comes first, so nothing was read."""
    from llama_lite import Llama

    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        with pytest.raises(CheckpointError, match="no CUDA GPU"):
            Llama.build(tmp_path / "nothing-here", device="cuda")
        with pytest.raises(CheckpointError, match="unknown dtype 'float8'"):
            Llama.build(tmp_path / "nothing-here", device="cpu", dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("flags, message", [(["--device", "cuda"], "no CUDA GPU"),
                                            (["--dtype", "float8"], "unknown dtype 'float8'")])
def test_cli_device_without_cuda_exits_2_with_one_line(flags, message):
    r = run_llama_lite("generate", "hello", *flags, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr


# -- memory: weights counted exactly -------------------------------------------------------------
@pytest.mark.parametrize("args", [SEVEN_B, ModelArgs.from_name("llama2-70b").replace(n_layers=2),
                                  ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_weight_bytes_are_model_bytes_of_the_built_model(args, dtype):
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    assert weight_bytes(args, dtype) == model_bytes(model)
    assert weight_bytes(args, dtype, "int8") == model_bytes(quantize_model_int8(model))


# -- the plan --------------------------------------------------------------------------------------
def test_t4_7b_fp16_does_not_fit_4096_with_everything_counted_so_int8():
    with fake_gpu("T4") as free:
        fp16 = plan_fit(SEVEN_B, "cuda", quantize=None, max_seq_len=512)  # fp16 alone, at a short context
        plan = plan_fit(SEVEN_B, "cuda")
    assert plan.dtype == torch.float16 and plan.quantize == "int8" and plan.max_seq_len == 4096
    assert plan.total <= free
    # what int8 was chosen over: fp16 at 4,096 tokens, whose weights and cache alone fit ...
    assert fp16.dtype == torch.float16 and fp16.quantize is None
    full = fp16.weights + plan.kv_cache
    assert full < free
    # ... but not with the prefill's activations, its float32 logits and a workspace margin
    assert full + plan.activations + plan.logits + plan.workspace > free
    assert "int8 fits" in plan.reason


def test_t4_7b_fp16_fits_a_short_context():
    with fake_gpu("T4"):
        plan = plan_fit(SEVEN_B, "cuda", max_seq_len=1024)
    assert (plan.dtype, plan.quantize, plan.max_seq_len) == (torch.float16, None, 1024)


def test_t4_without_int8_gets_the_longest_fp16_context_that_fits():
    with fake_gpu("T4") as free:
        plan = plan_fit(SEVEN_B, "cuda", quantize=None)
        longer = plan_fit(SEVEN_B, "cuda", quantize=None, max_seq_len=plan.max_seq_len + 256, free_bytes=10 ** 15)
    assert plan.quantize is None and 256 <= plan.max_seq_len < 4096 and plan.max_seq_len % 256 == 0
    assert plan.total <= free < longer.total
    assert "longest context" in plan.reason


def test_t4_13b_int8_gets_a_shorter_context():
    with fake_gpu("T4"):
        plan = plan_fit(ModelArgs.from_name("llama2-13b"), "cuda")
    assert plan.quantize == "int8" and 256 <= plan.max_seq_len < 4096


def test_t4_70b_fits_nowhere_and_says_so():
    with fake_gpu("T4"):
        with pytest.raises(CheckpointError, match="does not fit on cuda:0: even int8 weights"):
            plan_fit(ModelArgs.from_name("llama2-70b"), "cuda")


@pytest.mark.parametrize("gpu", ["L4", "A100-40GB", "H100-80GB"])
def test_ampere_and_newer_get_bf16_and_the_full_context(gpu):
    with fake_gpu(gpu) as free:
        plan = plan_fit(SEVEN_B, "cuda")
    assert (plan.dtype, plan.quantize, plan.max_seq_len, plan.batch_size) == (torch.bfloat16, None, 4096, 1)
    assert plan.total <= free and plan.fits


def test_cpu_plan_is_float32():
    with no_cuda_calls():
        plan = plan_fit(SEVEN_B, "cpu", free_bytes=64 * GiB)
    assert (plan.device, plan.dtype, plan.quantize, plan.max_seq_len) == (torch.device("cpu"), torch.float32, None, 4096)


def test_plan_describes_every_item():
    with fake_gpu("T4"):
        text = plan_fit(SEVEN_B, "cuda").describe()
    for item in ("weights", "KV cache", "prefill activations", "float32 logits", "workspace margin", "total estimate",
                 "free on the device", "why:"):
        assert item in text


def test_llama_build_follows_the_plan():
    """A CPU whose free memory holds SmolLM2 in int8 but not in float32: the plan says int8, and
    Llama.build(plan=plan) loads exactly that."""
    from llama_lite import Llama
    from llama_lite.checkpoint import read_model_args

    args = read_model_args(None)
    fp32 = plan_fit(args, "cpu", free_bytes=10 ** 15, max_seq_len=256, quantize=None)
    int8 = plan_fit(args, "cpu", free_bytes=10 ** 15, max_seq_len=256, quantize="int8")
    assert int8.total < fp32.total
    plan = plan_fit(args, "cpu", free_bytes=(int8.total + fp32.total) // 2, max_seq_len=256)
    assert (plan.dtype, plan.quantize, plan.max_seq_len) == (torch.float32, "int8", 256)
    llama = Llama.build(plan=plan)
    assert isinstance(llama.model.layers[0].attention.wq, Int8Linear)
    assert llama.model.params.max_seq_len == 256
    assert model_bytes(llama.model) == plan.weights
