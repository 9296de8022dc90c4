//! Scoring models and adapters on labelled data (`reft eval`).

pub mod choice;
pub mod generate;
pub mod metrics;

pub use choice::{
    evaluate_choice, read_choice_items, ChoiceFields, ChoiceFormat, ChoiceItem, ChoiceReport,
};
pub use generate::{evaluate_generate, read_generate_items, GenerateItem, GenerateReport};
