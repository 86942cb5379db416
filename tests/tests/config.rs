//! The checkpoint's config.json: the real hub file and the tiny test checkpoints parse into the values
//! the reference resolves (spec §6.1, Appendix A); malformed ones give typed errors.

use dsocr::{Config, Error, Mode};
use dsocr_tests::{checkpoint_dir, fixtures_dir};

fn hub_config_text() -> String {
    std::fs::read_to_string(fixtures_dir().join("hub/config.json")).unwrap()
}

#[test]
fn hub_config_resolves_to_the_spec_values() {
    let c = Config::from_json(&hub_config_text()).unwrap();
    let d = &c.decoder;
    assert_eq!(d.hidden_size, 1280);
    assert_eq!(d.num_hidden_layers, 12);
    assert_eq!(d.num_attention_heads, 10);
    assert_eq!(d.num_key_value_heads, 10);
    assert_eq!(d.head_dim, 128);
    assert_eq!(d.intermediate_size, 6848);
    assert_eq!(d.moe_intermediate_size, 896);
    assert_eq!(d.n_routed_experts, 64);
    assert_eq!(d.n_shared_experts, 2);
    assert_eq!(d.shared_intermediate_size(), 1792);
    assert_eq!(d.num_experts_per_tok, 6);
    assert_eq!(d.first_k_dense_replace, 1);
    assert_eq!(d.moe_layer_freq, 1);
    assert!(!d.norm_topk_prob);
    assert_eq!(d.routed_scaling_factor, 1.0);
    assert_eq!(d.rope_theta, 10000.0);
    assert_eq!(d.max_position_embeddings, 8192);
    assert_eq!(d.rms_norm_eps, 1e-6);
    assert_eq!(d.vocab_size, 129280);
    assert!(!d.tie_word_embeddings);
    assert_eq!((d.bos_token_id, d.eos_token_id), (0, 1));
    assert!(!d.is_moe_layer(0));
    assert!((1..12).all(|l| d.is_moe_layer(l)));

    let s = &c.sam;
    assert_eq!((s.width, s.layers, s.heads, s.head_dim()), (768, 12, 12, 64));
    assert_eq!(s.global_attn_indexes, vec![2, 5, 8, 11]);
    assert_eq!(s.downsample_channels, [512, 1024]);
    assert_eq!((s.patch_size, s.pretrain_grid, s.window_size, s.out_chans), (16, 64, 14, 256));
    assert_eq!(s.mlp_dim(), 3072);
    assert_eq!(s.layer_norm_eps, 1e-6);
    assert_eq!((s.rel_pos_side(0), s.rel_pos_side(2)), (14, 64));

    let v = c.clip().unwrap();
    assert_eq!((v.width, v.layers, v.heads, v.head_dim()), (1024, 24, 16, 64));
    assert_eq!((v.ffn_hidden_size, v.patch_size, v.image_size), (4096, 14, 224));
    assert_eq!((v.pretrain_grid(), v.num_positions()), (16, 257));
    assert_eq!(v.layer_norm_eps, 1e-5);

    assert_eq!((c.projector.input_dim, c.projector.n_embed), (2048, 1280));
}

#[test]
fn tiny_configs_apply_the_test_overrides() {
    let a = Config::from_json(&std::fs::read_to_string(checkpoint_dir("tiny-a").join("config.json")).unwrap()).unwrap();
    assert_eq!((a.sam.width, a.sam.layers, a.sam.heads), (32, 4, 2));
    assert_eq!(a.sam.global_attn_indexes, vec![1, 3]);
    assert_eq!((a.sam.window_size, a.sam.out_chans, a.sam.mlp_ratio), (14, 16, 4.0));
    assert_eq!(a.clip().unwrap().ffn_hidden_size, 96);
    assert_eq!((a.decoder.hidden_size, a.decoder.n_routed_experts, a.decoder.num_experts_per_tok), (48, 8, 3));

    let b = Config::from_json(&std::fs::read_to_string(checkpoint_dir("tiny-b").join("config.json")).unwrap()).unwrap();
    assert_eq!((b.sam.window_size, b.sam.out_chans, b.sam.mlp_ratio, b.sam.mlp_dim()), (7, 24, 2.0, 96));
    assert_eq!((b.clip().unwrap().width, b.clip().unwrap().heads, b.clip().unwrap().ffn_hidden_size), (40, 5, 80));
    assert_eq!((b.decoder.hidden_size, b.decoder.num_attention_heads, b.decoder.head_dim), (32, 2, 16));
    assert_eq!((b.decoder.n_shared_experts, b.decoder.num_experts_per_tok), (1, 2));
    assert_ne!(a, b);
}

fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&hub_config_text()).unwrap();
    edit(&mut v);
    v.to_string()
}

#[test]
fn malformed_configs_are_typed_errors() {
    assert!(matches!(Config::from_json("{not json"), Err(Error::Config(_))));
    let mla = edited(|v| v["use_mla"] = true.into());
    assert!(matches!(Config::from_json(&mla), Err(Error::Unsupported(_))));
    let no_sam = edited(|v| {
        v["vision_config"]["width"].as_object_mut().unwrap().remove("sam_vit_b");
    });
    let err = Config::from_json(&no_sam).unwrap_err();
    assert!(err.to_string().contains("sam_vit_b"), "{err}");
    let heads = edited(|v| v["num_attention_heads"] = 7.into());
    assert!(matches!(Config::from_json(&heads), Err(Error::Config(_))));
    let proj = edited(|v| v["projector_config"]["input_dim"] = 2047.into());
    assert!(matches!(Config::from_json(&proj), Err(Error::Config(_))));
    let unknown_override = edited(|v| v["dsocr_test_overrides"] = serde_json::json!({"sam_windows": 3}));
    assert!(matches!(Config::from_json(&unknown_override), Err(Error::Config(_))));
    // Sizes that would make the tensor list alone exhaust memory are refused up front.
    for (field, value) in [("n_routed_experts", 1_000_000_000u64), ("num_hidden_layers", 100_000), ("vocab_size", 1 << 40)] {
        let huge = edited(|v| v[field] = value.into());
        let err = Config::from_json(&huge).unwrap_err();
        assert!(matches!(err, Error::Config(_)) && err.to_string().contains(field), "{field}: {err}");
    }
    // Found by the `config` fuzz target: a CLIP image size whose position grid overflowed, and a
    // zero patch size (a division by zero) — both typed errors now.
    for (key, value) in [("image_size", 200_000_000_000_024u64), ("patch_size", 0)] {
        let bad_clip = edited(|v| v["vision_config"]["width"]["clip-l-14-224"][key] = value.into());
        let err = Config::from_json(&bad_clip).unwrap_err();
        assert!(matches!(err, Error::Config(_)) && err.to_string().contains("CLIP"), "{key}: {err}");
    }
}

#[test]
fn modes_have_the_reference_sizes() {
    let sizes: Vec<_> = Mode::ALL.iter().map(|m| (m.name(), m.base_size(), m.image_size(), m.crop_mode())).collect();
    assert_eq!(
        sizes,
        vec![
            ("tiny", 512, 512, false),
            ("small", 640, 640, false),
            ("base", 1024, 1024, false),
            ("large", 1280, 1280, false),
            ("gundam", 1024, 640, true),
        ]
    );
    assert_eq!("Gundam".parse::<Mode>().unwrap(), Mode::Gundam);
    assert!(matches!("huge".parse::<Mode>(), Err(Error::InvalidArgument(_))));
}
