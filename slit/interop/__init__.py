"""slit.interop: bringing pretrained weights from other frameworks into slit's NNX modules.

`hf_convert` converts Hugging Face PyTorch state dicts (as numpy arrays) into slit's pure-dict params:
the Whisper encoder (`whisper_encoder_params`) and the BLIP-2 Q-Former (`blip2_qformer_params`).
"""
