use serde_json::{json, Value};

use super::*;

/// The config PEFT 0.6.2 writes for `LoraConfig(r=4, lora_alpha=8, target_modules=[...], task_type="CAUSAL_LM")`.
fn written_by_0_6_2() -> Value {
    json!({
        "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "", "bias": "none",
        "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layers_pattern": null,
        "layers_to_transform": null, "lora_alpha": 8, "lora_dropout": 0.0, "modules_to_save": null,
        "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": null,
        "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM"
    })
}

/// The same config as PEFT 0.10.0 writes it.
fn written_by_0_10_0() -> Value {
    let mut config = written_by_0_6_2();
    let extra = json!({
        "layer_replication": null, "loftq_config": {}, "megatron_config": null, "megatron_core": "megatron.core",
        "use_dora": false, "use_rslora": false
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    config
}

fn current(overrides: Value) -> Value {
    let mut config = upgrade(&written_by_0_10_0(), true).unwrap().config;
    config["peft_version"] = json!("0.21.2");
    config
        .as_object_mut()
        .unwrap()
        .extend(overrides.as_object().unwrap().clone());
    config
}

fn config_error(result: Result<impl std::fmt::Debug>) -> String {
    match result {
        Err(Error::Config(message)) => message,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn upgrade_fills_every_current_field_with_its_default() {
    let up = upgrade(&written_by_0_6_2(), true).unwrap();
    let config = up.config.as_object().unwrap();
    assert_eq!(
        config.len(),
        41,
        "the 41 keys PEFT 0.21.2 writes for a LoraConfig"
    );
    assert_eq!(config["use_dora"], json!(false));
    assert_eq!(config["megatron_core"], json!("megatron.core"));
    assert_eq!(config["qalora_group_size"], json!(16));
    assert_eq!(config["peft_version"], Value::Null);
    assert_eq!(config["r"], json!(4));
    assert_eq!(config["target_modules"], json!(["v_proj", "q_proj"]));
    let keys: Vec<&String> = config.keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "keys are written sorted, like PEFT");
    assert!(up.notes.is_empty(), "{:?}", up.notes);
    assert_eq!(
        up.written_by.as_deref(),
        Some("PEFT 0.6.0 to 0.6.2 (inferred from its fields)")
    );
}

#[test]
fn writer_is_inferred_from_fields_or_read_from_peft_version() {
    let up = upgrade(&written_by_0_10_0(), true).unwrap();
    assert_eq!(
        up.written_by.as_deref(),
        Some("PEFT 0.10.0 to 0.13.2 (inferred from its fields)")
    );
    let up = upgrade(&current(json!({"peft_version": "0.19.0.dev0@abc"})), true).unwrap();
    assert_eq!(up.written_by.as_deref(), Some("PEFT 0.19.0.dev0@abc"));
    // oxpeft's stamp names oxpeft as the writer and still reads as the PEFT release it follows.
    let stamp = oxpeft_stamp(Version(0, 21, 2));
    let ours = inspect(&current(json!({ "peft_version": stamp }))).unwrap();
    assert_eq!(
        ours.written_by.as_deref(),
        Some(
            format!(
                "oxpeft {} (in PEFT 0.21.2's format)",
                env!("CARGO_PKG_VERSION")
            )
            .as_str()
        )
    );
    assert!(ours.loads_as_is.contains(&Version(0, 21, 2)));
    let hand_written =
        json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q"]});
    assert_eq!(upgrade(&hand_written, true).unwrap().written_by, None);
    // Every release since 0.18 writes peft_version, so the current layout without it is no release's.
    let upgraded = upgrade(&written_by_0_10_0(), true).unwrap().config;
    assert_eq!(upgrade(&upgraded, true).unwrap().written_by, None);
}

#[test]
fn fields_missing_from_a_stated_release_are_filled_with_one_note() {
    let mut config = written_by_0_10_0();
    config["peft_version"] = json!("0.21.2");
    let up = upgrade(&config, true).unwrap();
    assert_eq!(up.notes.len(), 1, "{:?}", up.notes);
    assert!(
        up.notes[0].contains("PEFT 0.21.2 writes these fields")
            && up.notes[0].contains("lora_bias=false")
    );
    assert_eq!(up.config["lora_bias"], json!(false));
}

#[test]
fn upgrade_is_idempotent() {
    let once = upgrade(&written_by_0_10_0(), true).unwrap().config;
    let twice = upgrade(&once, true).unwrap();
    assert_eq!(once, twice.config);
    assert!(twice.notes.is_empty());
}

#[test]
fn neutral_unknown_fields_are_dropped_with_a_note() {
    let mut config = current(json!({}));
    for (key, value) in [
        ("future_a", json!(null)),
        ("future_b", json!(false)),
        ("future_c", json!({})),
        ("future_d", json!([])),
    ] {
        config[key] = value;
    }
    let up = upgrade(&config, true).unwrap();
    assert!(up.config.get("future_a").is_none());
    assert_eq!(up.notes.len(), 4);
    assert!(
        up.notes.iter().all(|n| n.contains("neutral")),
        "{:?}",
        up.notes
    );
}

#[test]
fn non_neutral_unknown_field_is_refused_unless_not_strict() {
    let config = current(json!({"peft_version": "0.23.0", "use_hyper_lora": true}));
    let message = config_error(upgrade(&config, true));
    assert!(message.contains("'use_hyper_lora' = true"), "{message}");
    assert!(message.contains("PEFT 0.23.0"), "{message}");
    assert!(
        message.contains("newer than the newest oxpeft knows (0.21.2)"),
        "{message}"
    );
    assert!(message.contains("strict=False"), "{message}");

    let up = upgrade(&config, false).unwrap();
    assert!(up.config.get("use_hyper_lora").is_none());
    assert!(
        up.notes
            .iter()
            .any(|n| n.starts_with("WARNING") && n.contains("use_hyper_lora")),
        "{:?}",
        up.notes
    );
}

#[test]
fn legacy_layout_is_explained() {
    let mut config = written_by_0_6_2();
    config["merge_weights"] = json!(false);
    config["enable_lora"] = json!([true, false, true]);
    let message = config_error(upgrade(&config, true));
    assert!(
        message.contains("PEFT 0.1/0.2") && message.contains("enable_lora"),
        "{message}"
    );

    config["enable_lora"] = Value::Null;
    let up = upgrade(&config, true).unwrap();
    assert!(up.config.get("merge_weights").is_none() && up.config.get("enable_lora").is_none());
    assert!(
        up.notes.iter().any(|n| n.contains("merge_and_unload")),
        "{:?}",
        up.notes
    );
    assert!(up.written_by.unwrap().contains("0.1/0.2"));
}

#[test]
fn bad_configs_give_clear_errors() {
    assert!(config_error(parse("{\"r\": 8,")).contains("not valid JSON"));
    assert!(
        config_error(upgrade(&json!([1, 2]), true)).contains("expected a JSON object, got a list")
    );

    let mut config = written_by_0_6_2();
    config.as_object_mut().unwrap().remove("peft_type");
    assert!(config_error(upgrade(&config, true)).contains("missing required key 'peft_type'"));
    config["peft_type"] = json!("LORAX");
    let message = config_error(upgrade(&config, true));
    assert!(
        message.contains("'LORAX'") && message.contains("LORA, ADALORA"),
        "{message}"
    );
    config["peft_type"] = json!(3);
    assert!(config_error(upgrade(&config, true)).contains("'peft_type' must be a string"));

    let mut config = written_by_0_6_2();
    config.as_object_mut().unwrap().remove("r");
    assert!(config_error(upgrade(&config, true)).contains("missing required key 'r'"));
    config["r"] = json!("eight");
    let message = config_error(upgrade(&config, true));
    assert!(
        message.contains("field 'r'") && message.contains("non-negative integer"),
        "{message}"
    );
    config["r"] = json!(8);
    config["lora_alpha"] = Value::Null;
    assert!(config_error(upgrade(&config, true)).contains("'lora_alpha' is null"));
    config["lora_alpha"] = json!(16);
    config["bias"] = json!("some");
    assert!(config_error(upgrade(&config, true)).contains("one of none, all, lora_only"));

    let prompt = json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"});
    assert!(
        config_error(upgrade(&prompt, true)).contains("missing required key 'num_virtual_tokens'")
    );
}

#[test]
fn downgrade_keeps_exactly_the_fields_the_target_knows() {
    let config = current(json!({}));
    let for_0_10 = downgrade(&config, "0.10.0").unwrap();
    assert_eq!(for_0_10, written_by_0_10_0());
    let for_0_6 = downgrade(&config, "0.6.2").unwrap();
    assert_eq!(for_0_6, written_by_0_6_2());
    let for_0_18 = downgrade(&config, "0.18").unwrap();
    assert_eq!(
        for_0_18["peft_version"],
        json!(format!("0.18.0+oxpeft.{}", env!("CARGO_PKG_VERSION")))
    );
    assert!(for_0_18.get("lora_ga_config").is_none());
    assert!(for_0_18.get("ensure_weight_tying").is_some());
}

#[test]
fn downgrade_refuses_features_the_target_lacks() {
    let dora = current(json!({"use_dora": true}));
    let message = config_error(downgrade(&dora, "0.8.2"));
    assert!(
        message.contains("'use_dora' = true needs PEFT >= 0.9.0"),
        "{message}"
    );
    assert_eq!(downgrade(&dora, "0.9.0").unwrap()["use_dora"], json!(true));

    let message = config_error(downgrade(&current(json!({"use_rslora": true})), "0.7.1"));
    assert!(
        message.contains("use_rslora") && message.contains("0.8.0"),
        "{message}"
    );
    let message = config_error(downgrade(
        &current(json!({"lora_bias": true, "use_dora": true})),
        "0.8.0",
    ));
    assert!(
        message.contains("lora_bias") && message.contains("use_dora"),
        "every problem is listed: {message}"
    );
    let message = config_error(downgrade(
        &current(json!({"init_lora_weights": "pissa_niter_4"})),
        "0.10.0",
    ));
    assert!(
        message.contains("init_lora_weights") && message.contains("0.11.0"),
        "{message}"
    );
    let message = config_error(downgrade(
        &current(json!({"layers_pattern": ["layers", "h"]})),
        "0.5.0",
    ));
    assert!(message.contains("layers_pattern"), "{message}");

    // Settings that only matter together with a feature that is off are not features.
    let group = current(json!({"qalora_group_size": 32, "megatron_core": "other.core"}));
    let written = downgrade(&group, "0.10.0").unwrap();
    assert!(written.get("qalora_group_size").is_none());
    assert_eq!(written["megatron_core"], json!("other.core"));
    // A one-element list means the same as the string older releases take.
    let single = downgrade(&current(json!({"layers_pattern": ["layers"]})), "0.5.0").unwrap();
    assert_eq!(single["layers_pattern"], json!("layers"));
}

#[test]
fn downgrade_rejects_bad_targets() {
    let config = current(json!({}));
    assert!(config_error(downgrade(&config, "0.2.0")).contains("0.3.0 and later"));
    assert!(config_error(downgrade(&config, "latest")).contains("not a PEFT version"));
    let loha = json!({"peft_type": "LOHA", "r": 4, "alpha": 4, "target_modules": ["q"]});
    assert!(config_error(downgrade(&loha, "0.5.0")).contains("PEFT 0.5.0 has no LOHA adapters"));
    let qa = current(json!({"task_type": "QUESTION_ANS"}));
    assert!(config_error(downgrade(&qa, "0.3.0")).contains("QUESTION_ANS"));
}

#[test]
fn every_method_round_trips_through_every_release_it_exists_in() {
    let configs = [
        json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8}),
        json!({"peft_type": "ADALORA", "lora_alpha": 8, "init_r": 12, "target_r": 4, "total_step": 100}),
        json!({"peft_type": "IA3", "target_modules": ["k", "v", "down"], "feedforward_modules": ["down"]}),
        json!({"peft_type": "LOHA", "r": 4, "alpha": 8}),
        json!({"peft_type": "LOKR", "r": 4, "alpha": 8, "decompose_factor": -1}),
        json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "token_dim": 64}),
        json!({"peft_type": "P_TUNING", "num_virtual_tokens": 8, "encoder_hidden_size": 32}),
        json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8, "prefix_projection": true}),
    ];
    for config in configs {
        let full = upgrade(&config, true).unwrap().config;
        for release in table::RELEASES {
            let method = method_of(full.as_object().unwrap()).unwrap();
            if *release < method.since {
                continue;
            }
            let written = downgrade(&full, &release.to_string()).unwrap();
            let back = upgrade(&written, true).unwrap().config;
            let mut expected = full.clone();
            expected["peft_version"] = written.get("peft_version").cloned().unwrap_or(Value::Null);
            assert_eq!(back, expected, "{} through {release}", method.peft_type);
        }
    }
}

#[test]
fn inspect_reports_writer_features_and_loading_releases() {
    let dora = current(json!({"use_dora": true, "use_rslora": true}));
    let report = inspect(&dora).unwrap();
    assert_eq!(report.peft_type, "LORA");
    assert_eq!(report.written_by.as_deref(), Some("PEFT 0.21.2"));
    assert!(!report.written_by_inferred);
    assert_eq!(report.min_peft_version, Some(Version(0, 9, 0)));
    let fields: Vec<&str> = report.features.iter().map(|f| f.field.as_str()).collect();
    assert!(fields.ends_with(&["use_rslora", "use_dora"]), "{fields:?}");
    // 0.9 to 0.13 reject the keys they do not know; 0.14 on drop the neutral ones with a warning.
    assert_eq!(report.loads_as_is.first(), Some(&Version(0, 14, 0)));
    assert_eq!(report.loads_as_is.last(), Some(&newest_known_release()));

    let report = inspect(&written_by_0_10_0()).unwrap();
    assert!(report.written_by_inferred);
    assert_eq!(report.min_peft_version, Some(Version(0, 3, 0)));
    let json = report.to_json();
    assert_eq!(
        json["loads_as_is_ranges"],
        json!([["0.3.0", "0.5.0"], ["0.10.0", "0.21.2"]])
    );

    let unknown = current(json!({"future": 3}));
    let report = inspect(&unknown).unwrap();
    assert_eq!(report.min_peft_version, None);
    assert!(report.loads_as_is.is_empty());
    assert_eq!(
        report.unknown_fields,
        vec![Unknown {
            field: "future".into(),
            value: json!(3),
            neutral: false
        }]
    );
}

#[test]
fn a_huge_unknown_field_is_named_but_not_echoed() {
    let huge = "A".repeat(2_000_000);
    let config = current(json!({ "future": huge }));
    let err = upgrade(&config, true).unwrap_err().to_string();
    assert!(
        err.contains("unknown field 'future'"),
        "{}",
        &err[..200.min(err.len())]
    );
    assert!(err.len() < 2_000, "{} characters", err.len());
    assert!(err.contains("(2000002 characters)"));
    let notes = upgrade(&config, false).unwrap().notes;
    assert!(notes.iter().all(|n| n.len() < 2_000));
}
