"""Quantized checkpoint formats ds-plugins loads itself, engine-agnostic (no engine import here).

`ascend/`: msModelSlim (`quant_model_description.json`) W8A8, W8A8_DYNAMIC and W4A8_DYNAMIC.
"""
