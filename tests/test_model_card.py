"""The model card a save writes: how the model was distilled, with tags and citations (the Hub is out of reach here,
so the card is read from disk, where `push_to_hub` takes it from)."""

import yaml

from trl_npd import NearPolicyDistillTrainer


def card_of(path):
    text = (path / "README.md").read_text()
    _, front_matter, body = text.split("---", 2)
    return yaml.safe_load(front_matter), body


def test_save_model_writes_a_card_with_the_teacher_settings_tags_and_citations(
    tmp_path, tokenizer, student, teacher, dataset, make_config
):
    teacher.config._name_or_path = "org/teacher-1.7B"  # as if loaded from the Hub
    args = make_config(max_steps=0, max_staleness=5, weight_sync_steps=3, max_policy_kl=0.5, ifd_filter=True, beta=0.3)
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.save_model()
    meta, body = card_of(tmp_path / "out")
    assert {"trl", "trl-npd", "distillation"} <= set(meta["tags"])
    assert "distilled with trl_npd" in body
    assert "`org/teacher-1.7B`" in body
    for row in (
        "| staleness bound (`max_staleness`) | 5 optimizer steps |",
        "| weight sync interval (`weight_sync_steps`) | 3 optimizer steps |",
        "| drift refresh (`max_policy_kl`) | 0.5 |",
        "| Δ-IFD selection | absolute band [0, 0.8] |",
        "| objective | generalized Jensen-Shannon divergence, β = 0.3 (GKD's loss) |",
    ):
        assert row in body, row
    assert "arxiv.org/abs/2605.05940" in body  # NPD
    assert "agarwal2024on-policy" in body  # GKD


def test_the_card_names_the_top_k_objective_and_quantile_band_and_follows_a_save_elsewhere(
    tmp_path, tokenizer, student, teacher, dataset, make_config
):
    args = make_config(max_steps=0, teacher_top_k=10, ce_weight=0.1, ifd_filter=True, ifd_band="quantile")
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.save_model(str(tmp_path / "elsewhere"))
    _, body = card_of(tmp_path / "elsewhere")
    assert "over the teacher's top-10 tokens" in body and "0.1 × cross-entropy" in body
    assert "| Δ-IFD selection | quantile band [0.1, 0.9] over the last 1024 samples |" in body
    assert "a local model (Qwen3ForCausalLM)" in body
    assert not (tmp_path / "out" / "README.md").exists()  # saving elsewhere writes nothing into output_dir


def test_the_npd_section_is_added_once(tmp_path, make_config, teacher):
    from trl_npd.model_card import append_npd_section

    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n# An adapter card\n")
    for _ in range(2):
        append_npd_section(str(tmp_path), make_config(), teacher)
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Distillation") == 1
    assert text.startswith("---\nlibrary_name: peft\n---")  # the card that was there keeps its metadata
