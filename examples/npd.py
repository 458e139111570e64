"""Distil a teacher into a student from the command line, like TRL's GKD example.

    python examples/npd.py \
        --model_name_or_path Qwen/Qwen3-0.6B \
        --teacher_model_name_or_path Qwen/Qwen3-4B \
        --dataset_name trl-lib/chatbot_arena_completions \
        --learning_rate 2e-5 --per_device_train_batch_size 4 --lmbda 1.0 \
        --output_dir Qwen3-0.6B-NPD

The same as the installed `trl-npd` command. Add `--use_peft --lora_r 16 --lora_alpha 32` for LoRA, `--push_to_hub`
to publish, `--config recipe.yaml` to read the flags from a file. See docs/usage.md.
"""

from trl_npd.cli import main

if __name__ == "__main__":
    main()
