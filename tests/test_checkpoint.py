"""Checkpoints: safetensors round trip, content hash, half-precision export, AdaFace import."""

from __future__ import annotations

import argparse
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    HEAD_PREFIXES,
    content_hash,
    export_backbone,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from model.errors import CheckpointError
from model.net import OAMLNet, build_model
from model.training.adaface_import import import_adaface_ckpt


def randomise_stats(model: OAMLNet) -> OAMLNet:
    """Non-default BN statistics, so a round trip that drops buffers would show."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def model() -> OAMLNet:
    return randomise_stats(build_model("ir_18"))


class TestOurFormat:
    def test_round_trip_is_exact_and_carries_metadata(self, model: OAMLNet, tmp_path: Path) -> None:
        path = tmp_path / "m.safetensors"
        meta = save_checkpoint(model, path, {"calibration": {"threshold": 0.3}})
        loaded, meta2 = load_checkpoint(path)
        assert meta2 == meta == read_metadata(path)
        assert meta["architecture"] == "ir_18" and meta["input"]["channel_order"] == "BGR"
        assert meta["model_version"].startswith("ir_18-") and meta["calibration"] == {"threshold": 0.3}
        assert path.stat().st_mode & 0o777 == 0o644  # readable by a service running as another user
        x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            for a, b in zip(model(x), loaded(x), strict=True):
                torch.testing.assert_close(a, b)

    def test_content_hash_changes_with_any_weight(self, model: OAMLNet) -> None:
        state = model.state_dict()
        before = content_hash(state)
        state["occlusion_head.conv2.bias"] = state["occlusion_head.conv2.bias"] + 1e-3
        assert content_hash(state) != before

    def test_tampered_weights_are_refused(self, model: OAMLNet, tmp_path: Path) -> None:
        path = tmp_path / "m.safetensors"
        save_checkpoint(model, path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        tensors["output_layer.3.bias"] += 0.5
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(CheckpointError, match="content hash"):
            load_checkpoint(path)

    def test_files_without_oaml_metadata_are_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "plain.safetensors"
        save_file({"x": torch.zeros(1)}, str(path))
        with pytest.raises(CheckpointError, match="metadata"):
            load_checkpoint(path)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_export_is_smaller_and_close(
        self, model: OAMLNet, tmp_path: Path, dtype: torch.dtype
    ) -> None:
        full, half = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
        save_checkpoint(model, full)
        meta = export_backbone(model, half, dtype=dtype)
        assert meta["dtype"] == str(dtype).removeprefix("torch.")
        assert half.stat().st_size < 0.55 * full.stat().st_size
        loaded, _ = load_checkpoint(half)
        x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            cos = (model(x)[0] * loaded(x)[0]).sum(1)
        assert float(cos.min()) > 0.99


class HParams(argparse.Namespace):
    """A class torch's weights_only loader does not know, like Lightning's AttributeDict."""


class Exploit:
    """Unpickling this would run code if the loader were not restricted."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def write_lightning_ckpt(model: OAMLNet, path: Path, hparams: object, extra: dict | None = None) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    state["head.kernel"] = torch.randn(512, 7)
    state["head.t"] = torch.zeros(1)
    state["head.batch_mean"] = torch.tensor([21.5])
    state["head.batch_std"] = torch.tensor([3.25])
    torch.save(
        {"epoch": 25, "global_step": 1000, "state_dict": state, "hyper_parameters": hparams, **(extra or {})}, path
    )


class TestAdaFaceImport:
    def test_lightning_checkpoint_loads_the_backbone_strictly(self, model: OAMLNet, tmp_path: Path) -> None:
        path = tmp_path / "adaface_ir18_casia.ckpt"
        write_lightning_ckpt(model, path, HParams(arch="ir_18", head="adaface", m=0.4))
        imported, report = import_adaface_ckpt(path)
        assert report.architecture == "ir_18" and report.backbone_keys == 179
        assert report.missing_heads == ["occlusion_head", "qaconv"]
        assert report.head_batch_mean == pytest.approx(21.5) and report.head_batch_std == pytest.approx(3.25)
        assert report.hyper_parameters["head"] == "adaface"
        x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            torch.testing.assert_close(imported(x)[0], model(x)[0])
            torch.testing.assert_close(imported.forward_features(x), model.forward_features(x))

    def test_plain_dict_hparams_load_with_weights_only(self, model: OAMLNet, tmp_path: Path) -> None:
        path = tmp_path / "plain.ckpt"
        write_lightning_ckpt(model, path, {"arch": "ir_18"})
        assert import_adaface_ckpt(path)[1].architecture == "ir_18"

    def test_architecture_is_inferred_from_the_keys(self, model: OAMLNet, tmp_path: Path) -> None:
        path = tmp_path / "nohp.ckpt"
        write_lightning_ckpt(model, path, None)
        assert import_adaface_ckpt(path)[1].architecture == "ir_18"

    def test_pickled_code_is_never_executed(self, model: OAMLNet, tmp_path: Path) -> None:
        marker = tmp_path / "pwned"
        path = tmp_path / "evil.ckpt"
        write_lightning_ckpt(model, path, HParams(arch="ir_18"), extra={"callbacks": Exploit(marker)})
        import_adaface_ckpt(path)
        assert not marker.exists()

    def test_code_in_a_legacy_checkpoint_is_never_executed(self, model: OAMLNet, tmp_path: Path) -> None:
        """torch's legacy format read with a permissive pickle module runs the header pickles' code."""
        marker = tmp_path / "pwned"
        body = tmp_path / "legacy.ckpt"
        state = {"state_dict": {"model.x": torch.zeros(1)}, "hyper_parameters": Exploit(marker)}
        torch.save(state, body, _use_new_zipfile_serialization=False)
        header = tmp_path / "header.ckpt"  # the magic-number pickle itself calls a function
        header.write_bytes(pickle.dumps(Exploit(marker), protocol=2) + body.read_bytes()[2:])
        for path in (body, header):
            with pytest.raises(CheckpointError, match="cannot|refuse|not") as refused:
                import_adaface_ckpt(path)
            assert "\n" not in str(refused.value)
        assert not marker.exists()

    def test_torchscript_and_tar_archives_are_refused(self, model: OAMLNet, tmp_path: Path) -> None:
        scripted = tmp_path / "scripted.ckpt"
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
        with pytest.raises(CheckpointError, match="TorchScript"):
            import_adaface_ckpt(scripted)
        archive, member = tmp_path / "legacy.tar", tmp_path / "storages"
        member.write_bytes(b"\x80\x02" + bytes(64))
        with tarfile.open(archive, "w") as tar:
            tar.add(member, arcname="storages")
        with pytest.raises(CheckpointError, match="tar archive"):
            import_adaface_ckpt(archive)

    def test_with_a_torch_whose_safe_reader_has_known_escapes_only_oaml_reads(
        self, model: OAMLNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        zipped, legacy = tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt"
        write_lightning_ckpt(model, zipped, {"arch": "ir_18"})
        torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
        monkeypatch.setattr(torch, "__version__", "2.5.1")
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be used"))
        assert import_adaface_ckpt(zipped)[1].architecture == "ir_18"
        with pytest.raises(CheckpointError, match="needs 2.10"):
            import_adaface_ckpt(legacy)

    def test_wrong_architecture_is_a_clear_error(self, model: OAMLNet, tmp_path: Path) -> None:
        path = tmp_path / "ir18.ckpt"
        write_lightning_ckpt(model, path, {"arch": "ir_18"})
        with pytest.raises(CheckpointError, match="does not match ir_34"):
            import_adaface_ckpt(path, arch="ir_34")

    def test_non_checkpoints_are_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "x.ckpt"
        path.write_bytes(b"hello")
        with pytest.raises(CheckpointError):
            import_adaface_ckpt(path)


def test_cli_converts_an_adaface_checkpoint(model: OAMLNet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from oaml.cli import main

    src, out = tmp_path / "adaface.ckpt", tmp_path / "out.safetensors"
    write_lightning_ckpt(model, src, HParams(arch="ir_18"))
    assert main(["import-adaface", str(src), str(out), "--dtype", "float16"]) == 0
    meta = read_metadata(out)
    assert meta["dtype"] == "float16" and meta["untrained_heads"] == ["occlusion_head", "qaconv"]
    assert meta["quality"] == {"norm_mean": 21.5, "norm_std": 3.25}
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert '"architecture": "ir_18"' in capsys.readouterr().out


def test_cli_refuses_an_unsafe_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from oaml.cli import main

    marker, src = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Exploit(marker)}, src, _use_new_zipfile_serialization=False)
    assert main(["import-adaface", str(src), str(tmp_path / "out.safetensors")]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage() and str(src) in errors[0].getMessage()
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
