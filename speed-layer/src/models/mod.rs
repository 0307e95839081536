//! Profile models: small pieces of state that each fold events into one answer.
//!
//! A data scientist adds a model by writing one file with a type that implements
//! [`ProfileModel`] and adding one line to [`registry`]. The engine keeps each model's state in
//! the profile, stores it in the Elasticsearch document (so it survives eviction and restarts),
//! and writes the model's answer next to it. Models see events in per-user order, exactly once.

mod last_gender;
mod top_gender;
pub mod windowed_gender;

use std::fmt;

use chrono::{DateTime, Utc};
use pulse_core::Event;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::counts::NamedCounts;

pub use last_gender::LastGender;
pub use top_gender::TopGender;
pub use windowed_gender::WindowedTopGender;

/// A profile model. Its `Default` is the state of a user never seen before.
pub trait ProfileModel: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Name in configuration, the API (`?model=MODEL1`) and the document's `models`.
    const NAME: &'static str;

    /// Folds one event into the state. The one method a model must really think about.
    fn fold(&mut self, event: &Event);

    /// The model's current answer (`None`: not enough data). `now` lets windowed models expire
    /// old data even for users who have not been seen for a while.
    fn answer(&self, now: DateTime<Utc>) -> Option<String>;

    /// Takes in the state of another profile of the same person (an anonymous device's,
    /// merged when the person logged in on it): afterwards the state is what it would be had
    /// this profile folded both profiles' events. `other_is_newer` says which of the two was
    /// seen last, for models that keep "the latest" of something.
    fn merge(&mut self, other: Self, other_is_newer: bool);
}

/// A model's state behind a uniform interface, so the engine can hold a list of them.
pub trait ModelState: Send + Sync {
    /// The model's [`ProfileModel::NAME`].
    fn name(&self) -> &'static str;
    fn fold(&mut self, event: &Event);
    fn answer(&self, now: DateTime<Utc>) -> Option<String>;
    fn to_json(&self) -> serde_json::Value;
    fn clone_box(&self) -> Box<dyn ModelState>;
    /// [`ProfileModel::merge`] of a state of the same model (read through its stored form,
    /// which every state has; merges are rare). A state of another model is refused.
    fn merge(&mut self, other: &dyn ModelState, other_is_newer: bool) -> Result<(), String>;
}

impl<M: ProfileModel + Clone> ModelState for M {
    fn name(&self) -> &'static str {
        M::NAME
    }
    fn fold(&mut self, event: &Event) {
        ProfileModel::fold(self, event)
    }
    fn answer(&self, now: DateTime<Utc>) -> Option<String> {
        ProfileModel::answer(self, now)
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
    fn clone_box(&self) -> Box<dyn ModelState> {
        Box::new(self.clone())
    }
    fn merge(&mut self, other: &dyn ModelState, other_is_newer: bool) -> Result<(), String> {
        let other: M = serde_json::from_value(other.to_json()).map_err(|e| e.to_string())?;
        ProfileModel::merge(self, other, other_is_newer);
        Ok(())
    }
}

impl Clone for Box<dyn ModelState> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

impl fmt::Debug for Box<dyn ModelState> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

/// A profile's model states, in the order of the models enabled, each knowing its model's
/// name. A few per profile, so a short exact-size list rather than a map (whose node alone
/// was 400 bytes).
#[derive(Clone, Debug, Default)]
pub struct ModelStates(Box<[Box<dyn ModelState>]>);

impl ModelStates {
    /// The state `name`'s model has, if it is enabled.
    pub fn get(&self, name: &str) -> Option<&dyn ModelState> {
        self.0.iter().find(|s| s.name() == name).map(|s| s.as_ref())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Box<dyn ModelState>> {
        self.0.iter_mut()
    }
}

impl FromIterator<Box<dyn ModelState>> for ModelStates {
    fn from_iter<I: IntoIterator<Item = Box<dyn ModelState>>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// How the engine creates and restores a model's state.
#[derive(Clone, Copy)]
pub struct ModelKind {
    /// Name in configuration, the API (`?model=MODEL1`) and the document.
    pub name: &'static str,
    /// Document field holding the answer.
    pub field: &'static str,
    pub description: &'static str,
    new: fn() -> Box<dyn ModelState>,
    load: fn(serde_json::Value) -> Result<Box<dyn ModelState>, serde_json::Error>,
}

impl ModelKind {
    pub fn fresh(&self) -> Box<dyn ModelState> {
        (self.new)()
    }

    /// Restores stored state; state that does not parse (an older layout) restarts empty
    /// rather than blocking the profile.
    pub fn load(&self, state: serde_json::Value) -> Box<dyn ModelState> {
        (self.load)(state).unwrap_or_else(|e| {
            tracing::warn!(model = self.name, error = %e, "stored model state unreadable; starting it afresh");
            self.fresh()
        })
    }
}

impl fmt::Debug for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

fn kind<M: ProfileModel + Clone>(field: &'static str, description: &'static str) -> ModelKind {
    ModelKind {
        name: M::NAME,
        field,
        description,
        new: || Box::new(M::default()),
        load: |v| serde_json::from_value::<M>(v).map(|m| Box::new(m) as Box<dyn ModelState>),
    }
}

/// Every model Pulse ships. Add a line here for a new one.
pub fn registry() -> Vec<ModelKind> {
    vec![
        kind::<LastGender>(
            "gender_last",
            "gender of the last gender-bearing page visit",
        ),
        kind::<TopGender>("gender_top", "gender with the most visits so far"),
        kind::<WindowedTopGender>(
            "gender_top_7d",
            "gender with the most visits over the last 7 days",
        ),
    ]
}

/// The registered models named in `names` (all when empty), or the first unknown name.
pub fn select(names: &[String]) -> Result<Vec<ModelKind>, String> {
    let all = registry();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            all.iter()
                .find(|k| k.name.eq_ignore_ascii_case(n.trim()))
                .copied()
                .ok_or_else(|| {
                    let known: Vec<&str> = all.iter().map(|k| k.name).collect();
                    format!("unknown model {n}; known: {}", known.join(", "))
                })
        })
        .collect()
}

/// Distinct genders a model counts: `gender` is the client's free text, and state must stay
/// bounded whatever a partner sends (a device's state travels whole in a merge record).
/// Further values are not counted.
pub const MAX_GENDERS: usize = 32;

/// Adds `n` visits of `gender` to `counts`, unless it is a new gender beyond [`MAX_GENDERS`].
pub(crate) fn count_gender(counts: &mut NamedCounts, gender: &str, n: u64) {
    if counts.contains(gender) || counts.len() < MAX_GENDERS {
        counts.add(gender, n);
    }
}

/// Every count of `other` added to `counts`, within [`MAX_GENDERS`].
pub(crate) fn count_genders(counts: &mut NamedCounts, other: &NamedCounts) {
    for (g, n) in other.iter() {
        count_gender(counts, g, n);
    }
}

/// The gender an event shows, if it is a page visit that carries one. Declared genders
/// (`identify`) are not page visits and do not count.
pub(crate) fn visit_gender(event: &Event) -> Option<&str> {
    match event.event.as_str() {
        "page_view" | "product_view" | "product_click" | "product_list_view" | "add_to_cart"
        | "wishlist" => event.gender.as_deref().filter(|g| !g.is_empty()),
        _ => None,
    }
}
