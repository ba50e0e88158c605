"""Interop with the Hugging Face ecosystem: transformers checkpoints and PEFT adapters.

- `hf`: `load_checkpoint(dir, dtype, mesh) -> (ModelConfig, params, tokenizer)` and
  `export_checkpoint(params, cfg, dir, ...)` for Llama, Qwen2, Mistral and GPT-2.
- `peft`: `load_adapter(dir, params) -> adapter` and `save_adapter(adapter, dir, ...)`.
- `safetensors_io`: tensor-by-tensor safetensors reads, each device only its own block (the
  sharding rules that place them are `lora_limits.sharding`'s).

How a study runs on a checkpoint (`--config.model.hf_path=DIR`):

    cfg, params, tok = hf.load_checkpoint(path, dtype="float32")   # or mesh=..., "bfloat16"
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id or tok.eos_token_id
    # Prompts: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
    #   add_generation_prompt=True) if tok.chat_template else q; then
    #   tok(text, add_special_tokens=False)["input_ids"] -> data.encode(pairs, eos_id, pad_id, T)
    adapter, _ = train.train_lora(params, cfg, spec, data, ...)   # as with our own base
    peft.save_adapter(adapter, out_dir, arch=arch, num_layers=cfg.n_layers,
                      base_model_name_or_path=str(path))          # readable by PEFT users

`cfg` is an ordinary `ModelConfig`, so training, merging, routing and evaluation code needs
no change; `hf.infer_arch(cfg)` gives the arch to write adapters or checkpoints back with.
With a mesh (`lora_limits.sharding.fsdp_mesh()`), put the batch on
`sharding.batch_sharding(mesh, batch_size)` and call the jitted forward as usual: GSPMD
gathers each FSDP-sharded kernel where it is used.

This package imports transformers (configs, tokenizers) and safetensors, never torch or the
`peft` library: those are only needed by the parity tests.
"""
