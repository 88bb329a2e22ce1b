"""`mlx-dpo doctor [CONFIG]`: the machine's facts, and exit 1 when the config cannot run here."""
import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import mlx_dpo.doctor_config as doctor_config
import mlx_dpo.engines as engines
from mlx_dpo.cli import main
from mlx_dpo.doctor import measure_gflops
from mlx_dpo.hardware import DeviceInfo


def write_config(tmp_path, tiny_model, tiny_data, **sections) -> Path:
    raw = {"model": {"base_model": str(tiny_model), "lora_rank": 4},
           "data": {"train_file": str(tiny_data["train"]), "validation_file": str(tiny_data["val"])},
           "training": {"batch_size": 4}, "logging": {"output_dir": str(tmp_path / "out")}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def doctor(*args):
    return CliRunner().invoke(main, ["doctor", *args])


def findings(result) -> dict:
    return {f["name"]: f for f in json.loads(result.output)}


def test_system_report_names_every_fact(monkeypatch):
    monkeypatch.setenv("MLX_DPO_CACHE_DIR", "/tmp/somewhere")
    result = doctor()
    assert result.exit_code == 0, result.output
    for label in ("os", "chip", "memory", "version", "default device", "in use", "PyTorch", "available",
                  "MLX_DPO_CACHE_DIR"):
        assert re.search(rf"^\s+{re.escape(label)}\s", result.output, re.M), label
    assert re.search(r"\d+\.\d GFLOP/s", result.output)
    assert "/tmp/somewhere" in result.output


def test_measured_matmul_rate_is_plausible():
    rate = measure_gflops(n=256, repeats=2)
    assert 0.05 < rate < 100_000  # a real measurement, in GFLOP/s


def test_a_runnable_config_passes_with_its_batch_size(tmp_path, tiny_model, tiny_data):
    result = doctor(str(write_config(tmp_path, tiny_model, tiny_data)), "--no-measure", "--json")
    assert result.exit_code == 0, result.output
    found = findings(result)
    assert found["batch size"]["value"].startswith("4 pairs") and found["batch size"]["status"] == "ok"
    assert "parameters" in found["policy model"]["value"]
    assert found["memory"]["status"] == "ok"
    text = doctor(str(write_config(tmp_path, tiny_model, tiny_data)), "--no-measure")
    assert "verdict: this config can run here" in text.output


def test_auto_batch_size_comes_from_the_table(tmp_path, tiny_model, tiny_data):
    config = write_config(tmp_path, tiny_model, tiny_data, training={"batch_size": "auto"})
    found = findings(doctor(str(config), "--no-measure", "--json"))
    assert found["batch size"]["value"].startswith("4 pairs (auto: the batch table")


@pytest.mark.parametrize("sections, failing, message", [
    ({"compute": {"device": "cuda"}}, "device", "devices found: "),
    ({"data": {"train_file": "/nonexistent/train.jsonl"}}, "train_file", "file not found"),
    ({"model": {"base_model": "/nonexistent/model"}}, "policy model", "not found"),
])
def test_a_config_that_cannot_run_exits_1(tmp_path, tiny_model, tiny_data, sections, failing, message):
    result = doctor(str(write_config(tmp_path, tiny_model, tiny_data, **sections)), "--no-measure", "--json")
    assert result.exit_code == 1
    found = findings(result)
    assert found[failing]["status"] == "fail" and message in found[failing]["value"]


def test_a_model_too_big_for_memory_fails(tmp_path, tiny_model, tiny_data, monkeypatch):
    tiny_memory = DeviceInfo("cpu", "cpu (test)", 1e-5)  # ~10 KB: smaller than the tiny model's weights
    monkeypatch.setattr(doctor_config, "select_device", lambda cfg: tiny_memory)
    config = write_config(tmp_path, tiny_model, tiny_data, model={"finetune": "full"})
    result = doctor(str(config), "--no-measure", "--json")
    assert result.exit_code == 1
    assert "does not fit" in findings(result)["memory"]["value"]


def test_memory_estimate_counts_full_finetuning_state(make_config, tiny_model):
    sizes = {"policy": doctor_config.weight_sizes(tiny_model)}
    n = sizes["policy"]["float_params"]
    assert n == sizes["policy"]["params"] > 0
    cpu = DeviceInfo("cpu", "cpu", 16.0)
    lora = doctor_config.memory_estimate_gb(make_config(), cpu, "mlx", sizes)
    full = doctor_config.memory_estimate_gb(make_config(**{"model.finetune": "full"}), cpu, "mlx", sizes)
    # float32: LoRA holds the weights once; full adds gradients, two AdamW moments and a reference
    assert lora * 2**30 == pytest.approx(4 * n)
    assert full * 2**30 == pytest.approx(5 * 4 * n)


def test_quantized_model_with_the_torch_engine_fails(tmp_path, tiny_model, tiny_data):
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config_json = json.loads((tiny_model / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config_json, "quantization": {"bits": 4}}))
    config = write_config(tmp_path, tiny_model, tiny_data, model={"base_model": str(quantized)},
                          compute={"engine": "torch"})
    pytest.importorskip("torch")
    result = doctor(str(config), "--no-measure", "--json")
    assert result.exit_code == 1
    assert "MLX-quantized" in findings(result)["policy model"]["value"]


def test_bad_config_is_exit_2(tmp_path, tiny_model, tiny_data):
    result = doctor(str(write_config(tmp_path, tiny_model, tiny_data, compute={"devise": "cpu"})))
    assert result.exit_code == 2
    assert "compute.devise" in result.output and "Traceback" not in result.output


def test_num_devices_on_cuda_names_the_torchrun_command(tmp_path, tiny_model, tiny_data, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(engines, "cuda_device", lambda: DeviceInfo("cuda", "NVIDIA Test", 80.0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = write_config(tmp_path, tiny_model, tiny_data, compute={"device": "cuda", "num_devices": 2})
    result = doctor(str(config), "--no-measure", "--json")
    assert result.exit_code == 1
    line = findings(result)["num_devices"]
    assert line["status"] == "fail" and "torchrun --standalone --nproc_per_node 2 -m mlx_dpo train" in line["value"]


def test_set_without_a_config_is_refused():
    from click.testing import CliRunner

    from mlx_dpo.cli import main

    result = CliRunner().invoke(main, ["doctor", "--no-measure", "--set", "training.beta=0.2"])
    assert result.exit_code == 2 and "--set changes a CONFIG" in result.output


def test_a_malformed_record_fails_the_doctor_as_it_would_fail_training(tmp_path, tiny_model, tiny_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(tiny_data["train"]).read_text() + '{"prompt": "a", "chosen": 1}\n')
    line = len(bad.read_text().splitlines())
    result = doctor(str(write_config(tmp_path, tiny_model, tiny_data, data={"train_file": str(bad)})),
                    "--no-measure", "--json")
    assert result.exit_code == 1
    found = findings(result)["train_file"]
    assert found["status"] == "fail" and f"bad.jsonl:{line}:" in found["value"]
    skipping = doctor(str(write_config(tmp_path, tiny_model, tiny_data,
                                       data={"train_file": str(bad), "on_bad_record": "skip"})), "--no-measure", "--json")
    assert skipping.exit_code == 0
    found = findings(skipping)["train_file"]
    assert found["status"] == "warn" and "1 malformed skipped" in found["value"]


ZEN4_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl

processor\t: 1
model name\t: another
"""


def test_cpu_identity_tells_apart_cpus_a_virtual_machine_names_alike():
    from mlx_dpo.doctor import cpu_identity

    assert cpu_identity(ZEN4_CPUINFO) == "AMD EPYC, family 25 model 17, AVX-512"
    zen3 = ZEN4_CPUINFO.replace("model\t\t: 17", "model\t\t: 1").replace(" avx512f avx512dq avx512cd avx512bw avx512vl", "")
    assert cpu_identity(zen3) == "AMD EPYC, family 25 model 1, AVX2"
    arm = "processor\t: 0\nmodel name\t: Neoverse\nFeatures\t: fp asimd\n"
    assert cpu_identity(arm) == "Neoverse"
