"""The serving engine: requests -> scheduler -> runner (model over the hybrid cache) -> sampler -> outputs.

Modules: `sampling` (SamplingParams), `outputs` (RequestOutput, CompletionOutput), `sequence` (a request and
its sequences), `cache_manager` (KV blocks + GDN state slots, sizing), `scheduler` (continuous batching,
chunked prefill, preemption), `model_runner` (one varlen forward per step), `sampler` (the sampling maths),
`detokenize` (streamed text, stop strings), `llm_engine` (LLMEngine: add_request / step / abort), `llm` (LLM,
the offline API).
"""
