"""Model code, configs and weight loading for the Llama / Mistral / Qwen2 / Qwen3 family."""
