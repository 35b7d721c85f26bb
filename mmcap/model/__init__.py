"""The model's parts as plain `nn.Module`s: the ResNet encoder, the projection, the language-model
decoder and how it reads the image (fusion), LoRA, the tokenizer, and Hub loading."""
