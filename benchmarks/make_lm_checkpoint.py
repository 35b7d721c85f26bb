"""Write a small causal-LM checkpoint directory, as a hub model is laid out, for quality runs of
`decoder.pretrained` without downloading anything: a random-init `--family` model (default a
Llama of the demo preset's size) and its own word-level tokenizer, trained on a demo's training
captions. By default the tokenizer has no BOS token and pads with EOS, as Qwen2's does.

    python benchmarks/make_lm_checkpoint.py --captions 'data/glyphs/train-*.tar' --out runs/lm_llama_nobos
    mmcap fit --config configs/demo_llama.yaml --model.captioner.decoder.pretrained runs/lm_llama_nobos ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmcap.data.streams import iter_samples


def word_tokenizer(captions, with_bos: bool):
    """A lower-casing word-level tokenizer over `captions`; EOS always, BOS only `with_bos`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"eos_token": "<|endoftext|>", "unk_token": "<|unk|>"}
    if with_bos:
        specials["bos_token"] = "<|startoftext|>"
    tok = Tokenizer(models.WordLevel(unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=list(specials.values())))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials["eos_token"], **specials)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captions", required=True, help="shards whose captions train the tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--family", default="llama", help="a transformers model_type (llama, qwen2, mistral, ...)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--max-positions", type=int, default=128)
    p.add_argument("--with-bos", action="store_true", help="give the tokenizer a BOS token")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import AutoConfig, AutoModelForCausalLM

    captions = [c for ex in iter_samples(args.captions) for c in ex.captions]
    hf = word_tokenizer(captions, args.with_bos)
    config = AutoConfig.for_model(
        args.family, vocab_size=len(hf), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_positions, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    hf.save_pretrained(out)
    print(json.dumps({"out": str(out), "family": args.family, "vocab": len(hf), "bos_token": hf.bos_token,
                      "eos_token": hf.eos_token, "captions": len(captions)}))


if __name__ == "__main__":
    main()
