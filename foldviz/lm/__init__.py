"""Model folding for LLaMA-style decoders (Llama, Mistral, Qwen2, Qwen3 layouts in transformers).

Public API::

    from foldviz.lm import load_lm, find_lm_groups, fold_lm, lm_plan, perplexity, generate, save_lm

    lm = load_lm("demo:shakespeare-llama")            # or "hf:/path/to/save_pretrained_dir"
    groups = find_lm_groups(lm.model)                 # list[LMGroup]: MLP neurons + query heads per layer
    res = fold_lm(lm.model, lm_plan(0.2), method="fold")   # or "magnitude" / "random"
    tokens = lm.encode_documents(split_text("shakespeare:test"))
    perplexity(res.model, tokens)["perplexity"]
    generate(res.model, lm.tokenizer, "ROMEO.\\n")
    save_lm(res.model, "out/folded", tokenizer=lm.tokenizer, fold_summary=res.summary())

Command line: ``python -m foldviz.lm {inspect,fold,eval,train}`` (see docs/LLM.md).
No Streamlit import here; ``transformers`` and ``tokenizers`` are imported lazily where possible.
"""
from .corpus import TextError, read_text_file, split_text
from .evaluate import PROTOCOL, generate, perplexity
from .fold import LM_METHODS, LMFoldResult, count_params, fold_lm, layer_sizes, lm_plan, sync_config
from .groups import LMGroup, UnsupportedLMError, find_lm_groups
from .io import LMLoadError, LoadedLM, list_lm_demos, load_lm, save_lm

__all__ = [
    "LMGroup", "UnsupportedLMError", "find_lm_groups",
    "LM_METHODS", "LMFoldResult", "fold_lm", "lm_plan", "layer_sizes", "sync_config", "count_params",
    "PROTOCOL", "perplexity", "generate",
    "LMLoadError", "LoadedLM", "load_lm", "save_lm", "list_lm_demos",
    "TextError", "read_text_file", "split_text",
]
