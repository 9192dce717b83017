//! The Kafka topics meterline owns, their DLQ twins and schema files, and [`TopicMessage`], the
//! trait that ties a message type to its topic.
//!
//! Rule kept here: topic names are the base names; prefixing is the caller's job (services
//! prepend `TOPIC_PREFIX` from their config), and these helpers only concatenate.

use crate::error::SchemaError;

/// A topic with a versioned message schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// `usage.raw`: usage events from ingest and from direct producers.
    UsageRaw,
    /// `usage.windows`: per-window totals from the aggregator.
    UsageWindows,
    /// `usage.resync`: manual sync requests.
    UsageResync,
    /// `stripe.webhooks`: verified Stripe events from the webhook relay.
    StripeWebhooks,
}

impl Topic {
    const ALL: [Topic; 4] = [
        Topic::UsageRaw,
        Topic::UsageWindows,
        Topic::UsageResync,
        Topic::StripeWebhooks,
    ];

    /// Every topic, in pipeline order.
    pub fn all() -> &'static [Topic] {
        &Self::ALL
    }

    /// The topic name without prefix, e.g. `usage.raw`.
    pub fn base_name(self) -> &'static str {
        match self {
            Self::UsageRaw => "usage.raw",
            Self::UsageWindows => "usage.windows",
            Self::UsageResync => "usage.resync",
            Self::StripeWebhooks => "stripe.webhooks",
        }
    }

    /// The DLQ twin's name without prefix, e.g. `usage.raw.dlq`.
    pub fn dlq_base_name(self) -> &'static str {
        match self {
            Self::UsageRaw => "usage.raw.dlq",
            Self::UsageWindows => "usage.windows.dlq",
            Self::UsageResync => "usage.resync.dlq",
            Self::StripeWebhooks => "stripe.webhooks.dlq",
        }
    }

    /// `prefix` followed by the base name (`TOPIC_PREFIX` is prepended as is, no separator).
    pub fn name_with_prefix(self, prefix: &str) -> String {
        format!("{prefix}{}", self.base_name())
    }

    /// `prefix` followed by the DLQ twin's base name.
    pub fn dlq_name_with_prefix(self, prefix: &str) -> String {
        format!("{prefix}{}", self.dlq_base_name())
    }

    /// File name of the message's JSON Schema under `schemas/json/`, e.g.
    /// `usage.raw.v1.schema.json`.
    pub fn schema_file(self) -> &'static str {
        match self {
            Self::UsageRaw => "usage.raw.v1.schema.json",
            Self::UsageWindows => "usage.windows.v1.schema.json",
            Self::UsageResync => "usage.resync.v1.schema.json",
            Self::StripeWebhooks => "stripe.webhooks.v1.schema.json",
        }
    }

    /// The topic whose base name is `name`, if any.
    pub fn from_base_name(name: &str) -> Option<Topic> {
        Self::ALL.into_iter().find(|t| t.base_name() == name)
    }
}

/// A message type bound to its topic, so generic producer and consumer code can pick the topic,
/// the key and the codec from the type alone. Each implementor also has the same functions as
/// inherent methods (`codec::message_codec!` writes both).
pub trait TopicMessage: Sized {
    /// The topic this message travels on.
    const TOPIC: Topic;

    /// Parses and validates one message value.
    fn from_json_bytes(bytes: &[u8]) -> Result<Self, SchemaError>;

    /// The message value as compact JSON.
    fn to_json_bytes(&self) -> Vec<u8>;

    /// The Kafka key: it decides the partition, and so what stays in order.
    fn kafka_key(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let expected = [
            ("usage.raw", "usage.raw.dlq", "usage.raw.v1.schema.json"),
            (
                "usage.windows",
                "usage.windows.dlq",
                "usage.windows.v1.schema.json",
            ),
            (
                "usage.resync",
                "usage.resync.dlq",
                "usage.resync.v1.schema.json",
            ),
            (
                "stripe.webhooks",
                "stripe.webhooks.dlq",
                "stripe.webhooks.v1.schema.json",
            ),
        ];
        assert_eq!(Topic::all().len(), expected.len());
        for (topic, (base, dlq, file)) in Topic::all().iter().zip(expected) {
            assert_eq!(topic.base_name(), base);
            assert_eq!(topic.dlq_base_name(), dlq);
            assert_eq!(topic.schema_file(), file);
            assert_eq!(Topic::from_base_name(base), Some(*topic));
        }
        assert_eq!(Topic::from_base_name("usage.raw.dlq"), None);
    }

    #[test]
    fn prefixing_is_plain_concatenation() {
        assert_eq!(Topic::UsageRaw.name_with_prefix(""), "usage.raw");
        assert_eq!(Topic::UsageRaw.name_with_prefix("t42."), "t42.usage.raw");
        assert_eq!(
            Topic::StripeWebhooks.dlq_name_with_prefix("staging-"),
            "staging-stripe.webhooks.dlq"
        );
    }
}
