//! Scoring models and adapters on labelled data (`reft eval`).

pub mod choice;
pub mod metrics;

pub use choice::{
    evaluate_choice, read_choice_items, ChoiceFields, ChoiceFormat, ChoiceItem, ChoiceReport,
};
