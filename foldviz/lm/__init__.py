"""What is specific to decoder language models (Llama, Mistral, Qwen2, Qwen3, Gemma layouts in transformers).

Language models go through foldviz's one pipeline (:func:`foldviz.models.load_model`,
:func:`foldviz.apply.apply_method`, :func:`foldviz.report.build_report`, :func:`foldviz.persist.save_folded`,
the CLI and the app). This package holds only what differs for them:

* :mod:`~foldviz.lm.groups` — the groups of a decoder (MLP neurons, query heads per KV group);
* :mod:`~foldviz.lm.kind` — the kind adapter: applying a decision to the projections, perplexity, variance,
  what a transformers config can hold;
* :mod:`~foldviz.lm.io` — reading ``hf:DIR`` / ``demo:NAME`` validated before allocating, writing folds;
* :mod:`~foldviz.lm.corpus` and :mod:`~foldviz.lm.evaluate` — text specs, perplexity, generation;
* :mod:`~foldviz.lm.train` — training the bundled demo LMs.

Nothing is imported here, so ``import foldviz.lm.corpus`` stays light.
"""
