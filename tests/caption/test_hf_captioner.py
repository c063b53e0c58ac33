"""``--captioner hf``: local transformers vision-language models (tiny random Idefics3/SmolVLM and
llava-hf LLaVA-1.5 folders built in tiny_vlm.py), against transformers' own ``generate`` and a plain
argmax loop; bad folders; unusable captions; the ``caption`` and ``restore`` commands end to end."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
import tiny_vlm  # noqa: E402

from supir_rt.caption import make_captioner  # noqa: E402
from supir_rt.caption.hf import CONTENT_PROMPT, CaptionModelError, HfCaptioner, usable_caption  # noqa: E402

FAMILIES = {"idefics3": tiny_vlm.build_idefics3, "llava": tiny_vlm.build_llava}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    # a folder whose generation settings ask for sampling: the captioner must still decode greedily
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.7, top_p=0.9, top_k=5)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def reference_inputs(folder: Path, image):
    """The processor inputs built the way transformers documents it, independently of HfCaptioner."""
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CONTENT_PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor, processor(text=[text], images=[[image.convert("RGB")]], return_tensors="pt")


def argmax_loop(model, inputs, n: int, eos: int) -> list[int]:
    """Greedy decoding by hand: the full forward pass (no cache) over the growing sequence each step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    new: list[int] = []
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return new


def test_greedy_equals_transformers_generate(vlm_dir: Path, image) -> None:
    n = 12
    cap = make_captioner("hf", model_dir=vlm_dir, device="cpu", max_new_tokens=n)
    assert isinstance(cap, HfCaptioner) and cap.prompt == CONTENT_PROMPT
    ours = cap.caption_ids([image])[0]

    processor, inputs = reference_inputs(vlm_dir, image)
    model = transformers.AutoModelForImageTextToText.from_pretrained(vlm_dir, local_files_only=True).eval()
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n)
        by_hand = argmax_loop(model, inputs, n, model.generation_config.eos_token_id)
    theirs = generated[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours == theirs == by_hand
    assert len(set(ours)) > 1  # a real sequence, not one repeated token
    expected = usable_caption(processor.decode(theirs, skip_special_tokens=True))
    assert cap.caption(image) == expected
    cap.close()


def test_batch_equals_one_at_a_time(tmp_path: Path, image) -> None:
    cap = make_captioner("hf", model_dir=tiny_vlm.build_llava(tmp_path / "m"), device="cpu", max_new_tokens=8)
    other = image.transpose(0).resize((64, 48))
    assert cap.caption_ids([image, other]) == [cap.caption_ids([image])[0], cap.caption_ids([other])[0]]


def test_smolvlm_captions_the_global_view_only(tmp_path: Path, image) -> None:
    """SmolVLM's processor splits images into tiles; the captioner asks for the single global view."""
    folder = tiny_vlm.build_idefics3(tmp_path / "smol", split=True)
    processor, default = reference_inputs(folder, image)
    assert default["pixel_values"].shape[1] > 1  # tiles + global view by default
    cap = make_captioner("hf", model_dir=folder, device="cpu", max_new_tokens=4)
    ours = cap.inputs([image])
    assert ours["pixel_values"].shape[1] == 1
    assert ours["input_ids"].shape[1] < default["input_ids"].shape[1]
    assert 1 <= len(cap.caption_ids([image])[0]) <= 4


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(CaptionModelError, match="needs --caption-model"):
        make_captioner("hf")
    with pytest.raises(CaptionModelError, match="does not exist"):
        make_captioner("hf", model_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionModelError, match=r"config\.json is missing"):
        make_captioner("hf", model_dir=tmp_path / "empty")
    model = tiny_vlm.build_llava(tmp_path / "llava")
    partial = tmp_path / "partial"
    shutil.copytree(model, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(CaptionModelError, match=r"no model weights: none of model\.safetensors"):
        make_captioner("hf", model_dir=partial)
    (partial / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    (partial / "processor_config.json").unlink()
    with pytest.raises(CaptionModelError, match="no image processor"):
        make_captioner("hf", model_dir=partial)
    with pytest.raises(CaptionModelError, match="'llama' model.*text-only"):
        make_captioner("hf", model_dir=tiny_vlm.build_text_only(tmp_path / "text"))
    with pytest.raises(ValueError, match="dtype 'int3'"):
        make_captioner("hf", model_dir=model, dtype="int3")


def test_unusable_captions_become_empty(tmp_path: Path, image, caplog, monkeypatch) -> None:
    assert usable_caption("  A red car\non a street.</s>") == "A red car on a street."
    assert usable_caption("\ufffd\x00 , .\ufffd") == ""
    assert usable_caption("") == ""
    cap = make_captioner("hf", model_dir=tiny_vlm.build_llava(tmp_path / "m"), device="cpu")
    eos = cap.processor.tokenizer.eos_token_id
    monkeypatch.setattr(cap, "caption_ids", lambda images: [[eos]] * len(images))  # the model answers nothing
    with caplog.at_level(logging.WARNING):
        assert cap.caption(image) == ""
    assert "no usable text" in caplog.text


def test_offline_loading_never_asks_the_hub(vlm_dir: Path, image, monkeypatch) -> None:
    """Any hub request fails this test (the folder must be enough)."""
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("hub access")

    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    cap = make_captioner("hf", model_dir=vlm_dir, device="cpu", max_new_tokens=3)
    assert isinstance(cap.caption(image), str)


# -- the commands ---------------------------------------------------------------------------------


def test_caption_command(tmp_path: Path, image, capsys) -> None:
    from supir_rt import cli

    folder = tiny_vlm.build_idefics3(tmp_path / "smol")
    src = tmp_path / "a.png"
    image.save(src)
    code = cli.main(["caption", str(src), "--captioner", "hf", "--caption-model", str(folder),
                     "--max-new-tokens", "6", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    expected = HfCaptioner(folder, device="cpu", max_new_tokens=6).caption(image)
    assert out.out == expected + "\n"
    code = cli.main(["caption", str(src), "--captioner", "hf", "--caption-model", str(tmp_path)])
    assert code == 2 and "config.json is missing" in capsys.readouterr().err


def test_restore_command_with_hf_captioner(tmp_path: Path, capsys, monkeypatch) -> None:
    """``supir-rt restore --tiny-random --captioner hf``: the model captions the stage-1 image and the
    caption is what the output's metadata records and the prompt starts with."""
    from PIL import Image

    from supir_rt import cli
    from supir_rt.images import read_metadata

    made = []
    original = HfCaptioner.caption_many

    def recording(self, images):
        made.append((images[0].size, original(self, images)[0]))
        return [made[-1][1]]

    monkeypatch.setattr(HfCaptioner, "caption_many", recording)
    folder = tiny_vlm.build_llava(tmp_path / "llava")
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(src)
    argv = ["restore", str(src), "-o", str(out), "--tiny-random", "--device", "cpu", "--captioner", "hf",
            "--caption-model", str(folder), "-q"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    meta = read_metadata(out)
    [(size, caption)] = made
    assert min(size) == 512  # the stage-1 image at short side 512, as for LLaVA
    assert caption and meta["caption"] == caption
    assert meta["prompt"] == caption + meta["settings"]["a_prompt"]


def test_restore_command_refuses_bad_captioner_folders(tmp_path: Path, capsys) -> None:
    """A text-only model given as captioner, or no --caption-model: one error line, exit code 2, no output."""
    from PIL import Image

    from supir_rt import cli

    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(src)
    text_only = tiny_vlm.build_text_only(tmp_path / "text")
    capsys.readouterr()
    code = cli.main(["restore", str(src), "-o", str(out), "--tiny-random", "--captioner", "hf",
                     "--caption-model", str(text_only), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "text-only" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    code = cli.main(["restore", str(src), "-o", str(out), "--tiny-random", "--captioner", "hf", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--caption-model" in err
    assert not out.exists()
