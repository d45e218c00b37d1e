"""Drop-in APIs: OpenAI's and Ollama's HTTP shapes over the same bus path as the native API.

Adapters translate the request into a `GenerateRequest` and the event stream back into the
foreign shape; admission, routing, cancellation and tracing are the native path's, unchanged.
"""
