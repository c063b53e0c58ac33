"""Tiny random transformers vision-language model folders, built offline (no hub): a byte-level BPE
tokenizer trained here on a few sentences, the family's image processor at 56 px, our own short chat
template in the family's format, random weights, all written with ``save_pretrained``.

Families: Idefics3 (SmolVLM's architecture) and llava-hf LLaVA-1.5; plus a text-only Llama folder
(with a tokenizer, no image processor) for the refusal test.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a red car parked on a street, photo, sunny day.",
    "The image shows a cat sitting on a wooden table next to a window, soft light.",
    "Describe the content of this image in one or two sentences.",
    "User: Assistant: USER: ASSISTANT: the main subjects, the setting, and their colours.",
]


def bpe_tokenizer(special: list[str], bos: str, eos: str, **extra: str):
    """A transformers fast tokenizer: byte-level BPE (vocab ~300) trained on CORPUS, ``special`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=special[0],
                                   extra_special_tokens=extra or None)


def _text_config(tokenizer, **kw):
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)


# "User:<image>question<end_of_utterance>\nAssistant:" (SmolVLM's turn format)
IDEFICS3_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# "USER: <image>\nquestion ASSISTANT:" (llava-hf LLaVA-1.5's turn format)
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_idefics3(folder: Path, seed: int = 0, split: bool = False) -> Path:
    """Idefics3 (SmolVLM): 2-layer SigLIP at 56 px (16 patches, pixel shuffle 2 -> 4 image tokens) + 2-layer Llama.
    ``split``: the processor splits images into 56-px tiles of a 112-px longest edge, as SmolVLM's does."""
    import torch
    import transformers as T

    tokenizer = bpe_tokenizer(
        ["<|endoftext|>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"],
        bos="<|endoftext|>", eos="<end_of_utterance>", image_token="<image>",
        fake_image_token="<fake_token_around_image>", global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
    )
    image_processor = T.Idefics3ImageProcessorPil(size={"longest_edge": 112 if split else 56},
                                                  max_image_size={"longest_edge": 56}, do_image_splitting=split)
    processor = T.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                    chat_template=IDEFICS3_TEMPLATE)
    config = T.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14),
        text_config=_text_config(tokenizer), scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    T.Idefics3ForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_llava(folder: Path, seed: int = 0) -> Path:
    """llava-hf LLaVA-1.5: 2-layer CLIP at 56 px (16 features, CLS dropped) + 2-layer Llama."""
    import torch
    import transformers as T

    tokenizer = bpe_tokenizer(["<pad>", "<s>", "</s>", "<image>"], bos="<s>", eos="</s>", image_token="<image>")
    image_processor = T.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=LLAVA_TEMPLATE)
    config = T.LlavaConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, image_size=56, patch_size=14,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, projection_dim=32),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
    )
    torch.manual_seed(seed)
    T.LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_text_only(folder: Path) -> Path:
    """A 1-layer Llama causal LM with its tokenizer (and, to get past the file check, an image processor
    config copied from nowhere in particular): what a user might pass by mistake."""
    import transformers as T

    tokenizer = bpe_tokenizer(["<pad>", "<s>", "</s>"], bos="<s>", eos="</s>")
    config = T.LlamaConfig(**{k: v for k, v in _text_config(tokenizer).items() if k != "model_type"})
    config.num_hidden_layers = 1
    T.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    T.CLIPImageProcessorPil().save_pretrained(folder)
    return folder
