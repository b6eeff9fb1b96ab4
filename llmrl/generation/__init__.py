"""Generation behind one interface: an engine samples completions (`engine.py`: llmrl's own
KV-cache loop, `TransformersEngine`; `vllm_engine.py`: vLLM colocated in the training process,
`VLLMEngine`), and `collect.RolloutCollector` turns prompt batches into the online trainer's scored
rollouts with any engine. Evaluation samples through the same engines."""

from llmrl.generation.engine import SamplingParams, TransformersEngine, make_engine

__all__ = ["SamplingParams", "TransformersEngine", "make_engine"]
