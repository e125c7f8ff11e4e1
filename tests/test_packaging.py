"""What `pip install fedtune` puts on a user's path: one top-level name, `fedtune`."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # pip builds and installs
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("fedtune-*.whl")
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def wheel_names(wheel: zipfile.ZipFile) -> list[str]:
    return wheel.namelist()


def test_the_wheel_has_one_top_level_name(wheel_names: list[str]):
    top_level = {name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fedtune"}


def test_every_subpackage_and_its_data_is_in_the_wheel(wheel_names: list[str]):
    for module in ("fedtune/__init__.py", "fedtune/py.typed", "fedtune/strategies/api.py", "fedtune/tasks/data.py",
                   "fedtune/protos/fedtune.proto", "fedtune/protos/fedtune_pb2.py", "fedtune/fedserver/cli.py",
                   "fedtune/fedclient/cli.py", "fedtune/simulations/cli.py"):
        assert module in wheel_names, module


def test_benchmark_and_test_modules_stay_out_of_the_wheel(wheel_names: list[str]):
    assert not [name for name in wheel_names if "/tests/" in name or "/benchmarks/" in name or "/examples/" in name]
    assert not [name for name in wheel_names if name.endswith(("admm_wls.py", "rouge.py"))]


def test_console_scripts_point_into_the_namespace(wheel: zipfile.ZipFile, wheel_names: list[str]):
    (entry_points_file,) = [name for name in wheel_names if name.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points_file).decode())
    assert dict(parser["console_scripts"]) == {"fedsim": "fedtune.simulations.cli:main",
                                                "fedserver": "fedtune.fedserver.cli:main",
                       "fedclient": "fedtune.fedclient.cli:main"}
