"""The HTTP service (`make serve`): OpenAI-compatible image generation with continuous batching.

    from service.config import Settings
    from service.server import serve
    serve(Settings(model_dir="models/shapes64"))     # or: python -m service --model ...

`service.app.create_app(settings)` builds the ASGI app alone (tests, other servers).
"""
