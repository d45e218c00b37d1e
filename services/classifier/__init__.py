"""The classifier: routes `"model": "auto"` requests to a model, and classifies text on demand."""
