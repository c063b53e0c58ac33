"""What one ``--captioner hf`` caption costs on this machine, at a small captioner's real dimensions.

A measurement, not a test, and no download: the model is built from a config with the published
dimensions and random weights (the cost of a forward pass does not depend on the weight values), the
tokenizer is the tests' tiny one, and the caption length is forced (``min_new_tokens``) since a random
model's captions end at random places. The image goes through the family's real image processor
settings (SmolVLM: longest edge 2048, 512-px tiles; ``HfCaptioner`` turns the tiling off and keeps
the 64-token global view, ``--split`` keeps the tiles: 16 + 1 views, 1088 tokens, for a 683x512
image), then ``HfCaptioner`` runs it as in a restore.

    python benchmarks/hf_caption_cost.py --model smolvlm-256m --new-tokens 60
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "caption"))

# SmolVLM-256M: SmolLM2-135M text model + SigLIP base-patch16-512, pixel shuffle 4 (64 tokens per 512 tile).
# SmolVLM-500M: SmolLM2-360M text model, same vision tower.
MODELS = {
    "smolvlm-256m": {"text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                  num_key_value_heads=3, vocab_size=49280, rope_theta=100000.0)},
    "smolvlm-500m": {"text": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                                  num_key_value_heads=5, vocab_size=49280, rope_theta=100000.0)},
}
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512,
              patch_size=16)


def build(folder: Path, model: str) -> int:
    import torch
    import transformers as T

    import tiny_vlm

    tokenizer = tiny_vlm.bpe_tokenizer(
        ["<|endoftext|>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"],
        bos="<|endoftext|>", eos="<end_of_utterance>", image_token="<image>",
        fake_image_token="<fake_token_around_image>", global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
    )
    image_processor = T.Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                                                  do_image_splitting=True)
    processor = T.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64,
                                    chat_template=tiny_vlm.IDEFICS3_TEMPLATE)
    text = dict(MODELS[model]["text"], model_type="llama", bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    config = T.Idefics3Config(vision_config=VISION, text_config=text, scale_factor=4,
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    net = T.Idefics3ForConditionalGeneration(config).eval()
    net.save_pretrained(folder)
    processor.save_pretrained(folder)
    return sum(p.numel() for p in net.parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smolvlm-256m")
    p.add_argument("--new-tokens", type=int, default=60, help="caption length forced (a CLIP-sized caption: ~60)")
    p.add_argument("--size", default="683x512", help="caption image W x H (the stage-1 image at short side 512)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--split", action="store_true", help="keep SmolVLM's image splitting (the processor's default)")
    args = p.parse_args()

    import torch
    from PIL import Image

    from supir_rt.caption import hf
    from supir_rt.caption.hf import HfCaptioner

    if args.split:
        hf.IMAGE_OPTIONS.clear()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        params = build(folder, args.model)
        disk = sum(f.stat().st_size for f in folder.iterdir())
        cap = HfCaptioner(folder, device="cpu", dtype=args.dtype, max_new_tokens=args.new_tokens)
        t0 = time.perf_counter()
        cap.model  # load
        load_s = time.perf_counter() - t0
        inputs = cap.inputs([image])
        prompt_tokens = int(inputs["input_ids"].shape[1])
        kw = dict(cap.generation_kwargs(), min_new_tokens=args.new_tokens)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = cap.model.generate(**cap.inputs([image]), **kw)
            times.append(time.perf_counter() - t0)
        assert out.shape[1] - prompt_tokens == args.new_tokens
    print(json.dumps({
        "model": args.model, "dimensions": "published, random weights", "parameters_m": params / 1e6,
        "fp32_files_gb": disk / 1e9, "dtype": args.dtype, "image": args.size, "prompt_tokens": prompt_tokens,
        "new_tokens": args.new_tokens, "image_splitting": args.split, "load_s": load_s, "caption_s": min(times), "caption_s_runs": times,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "threads": torch.get_num_threads(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
