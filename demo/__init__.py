"""The Gradio demo (`bot demo`): chat with the routed adapters, inspect them and the eval report."""
