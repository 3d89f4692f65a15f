"""`r1lab serve`: a checkpoint behind an OpenAI/DeepSeek-compatible API, with a chat page.

protocol.py   request schemas, response objects, OpenAI error JSON
handlers.py   what each route does (validate, render, submit, answer or stream, book the cost)
app.py        the FastAPI app: routes, error handlers, the chat page (static/index.html)
engine.py     continuous batching of concurrent requests over one step engine (one worker thread)
reasoning.py  the <think> split into reasoning_content/content, whole or streaming
prompts.py    chat template rendering and the context budget
metrics.py    counters, tokens/s and $ per million tokens, Prometheus text
commands.py   the command line; vllm_engine.py the GPU engine; scripted.py a model-free engine
background.py run the server in a thread (tests, benchmarks)
"""
