"""Evaluation through lmms-eval: PRISM's tasks, model adapters, runner and result store.

    evaluation/tasks/embedded/    one lmms-eval task per family of the embedded world + the prism_embedded group
    evaluation/tasks/published/   PRISM's overrides of the seven published benchmarks (prism_<name>)
    config.py                     EvalConfig (decoding, suites, judge, vLLM) and EvalError
    model.py, vllm_model.py       lmms-eval models: PrismHF (transformers, CPU), PrismVLLM (full world)
    plugin.py                     lmms_eval.models entry points (prism_hf, prism_vllm)
    scoring.py, published.py      per-sample scoring with prism.response_format / prism.rewards
    judge.py                      the OpenAI-compatible judge behind judge-dependent metrics
    runner.py                     run_eval: results JSON + samples under outputs/evals/<checkpoint-hash>/
    dataset_sources.py            the published tasks' datasets; without the Hub, cached or local or one error line
    results.py                    results JSON -> tidy rows; the CSV store (read_store -> pandas)

Importing this package does not import lmms-eval; the modules that need it import it themselves.
"""

from evaluation.config import EvalConfig, EvalError

__all__ = ["EvalConfig", "EvalError"]
