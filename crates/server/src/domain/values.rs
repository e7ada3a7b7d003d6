//! Input values that can only hold valid values: parse once, where they enter.

use super::DomainError;

/// Longest message text, in characters (Unicode scalar values).
pub const MAX_TEXT_CHARS: usize = 100_000;
/// Longest visitor id.
pub const MAX_VISITOR_ID_CHARS: usize = 256;
/// Longest name, email or mark.
pub const MAX_LABEL_CHARS: usize = 255;

/// A message text: present, not blank, at most [`MAX_TEXT_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(String);

impl Text {
    /// Parses the `text` field.
    pub fn parse(value: Option<String>) -> Result<Self, DomainError> {
        let Some(text) = value else {
            return Err(DomainError::Missing("text is required".into()));
        };
        if text.trim().is_empty() {
            return Err(DomainError::Missing(
                "text must not be empty or only whitespace".into(),
            ));
        }
        // Cheap bound first: a string of n bytes has at most n characters.
        if text.len() > MAX_TEXT_CHARS {
            let chars = text.chars().count();
            if chars > MAX_TEXT_CHARS {
                return Err(DomainError::OutOfRange(format!(
                    "text is {chars} characters long; the maximum is {MAX_TEXT_CHARS}"
                )));
            }
        }
        Ok(Self(text))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A visitor id: any non-empty string up to [`MAX_VISITOR_ID_CHARS`] characters without
/// control characters (sites may bind their own user ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitorId(String);

impl VisitorId {
    /// Parses the `visitorId` field.
    pub fn parse(value: Option<String>) -> Result<Self, DomainError> {
        let Some(id) = value else {
            return Err(DomainError::Missing("visitorId is required".into()));
        };
        if id.trim().is_empty() {
            return Err(DomainError::Missing("visitorId must not be empty".into()));
        }
        let chars = id.chars().count();
        if chars > MAX_VISITOR_ID_CHARS {
            return Err(DomainError::OutOfRange(format!(
                "visitorId is {chars} characters long; the maximum is {MAX_VISITOR_ID_CHARS}"
            )));
        }
        if id.chars().any(char::is_control) {
            return Err(DomainError::Invalid(
                "visitorId must not contain control characters".into(),
            ));
        }
        Ok(Self(id))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a request names an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRef {
    /// By id; the agent must exist in the account.
    Id(String),
    /// By email; with a name, an unknown email creates the agent.
    Email {
        /// Email address.
        email: String,
        /// Display name.
        name: Option<String>,
    },
}

impl AgentRef {
    /// Parses `agentId` / `agentEmail` / `agentName`. `agentId` wins when both are given.
    pub fn parse(
        agent_id: Option<String>,
        agent_email: Option<String>,
        agent_name: Option<String>,
    ) -> Result<Self, DomainError> {
        let agent_name = agent_name
            .filter(|n| !n.trim().is_empty())
            .map(|n| parse_name("agentName", Some(&n)))
            .transpose()?;
        match (agent_id, agent_email) {
            (Some(id), _) if !id.trim().is_empty() => {
                if id.chars().count() > MAX_LABEL_CHARS {
                    return Err(DomainError::OutOfRange(format!(
                        "agentId is longer than {MAX_LABEL_CHARS} characters"
                    )));
                }
                Ok(AgentRef::Id(id))
            }
            (_, Some(email)) if !email.trim().is_empty() => Ok(AgentRef::Email {
                email: parse_email("agentEmail", &email)?,
                name: agent_name,
            }),
            _ => Err(DomainError::Missing(
                "agentId or agentEmail is required: name the agent by agentId, or by agentEmail \
                 (with agentName to create an agent that does not exist yet)"
                    .into(),
            )),
        }
    }
}

/// A message from an agent, parsed.
#[derive(Debug, Clone)]
pub struct AgentMessage {
    /// Recipient.
    pub visitor_id: VisitorId,
    /// Text.
    pub text: Text,
    /// Sender.
    pub agent: AgentRef,
    /// Integration mark.
    pub received_from: Option<String>,
}

/// A pushed message, parsed.
#[derive(Debug, Clone)]
pub struct PushedMessage {
    /// Recipient.
    pub visitor_id: VisitorId,
    /// Text.
    pub text: Text,
    /// Send as this agent.
    pub agent_id: Option<String>,
    /// Else as an agent of this group.
    pub group_id: Option<String>,
}

/// Largest page of messages.
pub const MAX_PAGE: u32 = 100;
/// Page size when none is asked for.
pub const DEFAULT_PAGE: u32 = 50;

/// A request for a page of messages: cursors are message ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Messages written before this one.
    pub before: Option<String>,
    /// Messages written after this one.
    pub after: Option<String>,
    /// How many, 1 to [`MAX_PAGE`].
    pub limit: u32,
}

impl PageRequest {
    /// Parses the query parameters; a blank cursor counts as absent.
    pub fn parse(
        before: Option<String>,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Result<Self, DomainError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(DomainError::OutOfRange(format!(
                "limit must be between 1 and {MAX_PAGE}, not {limit}"
            )));
        }
        let cursor = |c: Option<String>| c.filter(|c| !c.trim().is_empty());
        Ok(Self {
            before: cursor(before),
            after: cursor(after),
            limit,
        })
    }
}

/// A required, non-blank name of at most [`MAX_LABEL_CHARS`] characters, trimmed.
pub fn parse_name(field: &str, value: Option<&str>) -> Result<String, DomainError> {
    let name = value.map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return Err(DomainError::Missing(format!("{field} is required")));
    }
    parse_label(field, name, MAX_LABEL_CHARS)
}

/// A free-form label (mark, URL) of at most `max` characters without control characters.
pub fn parse_label(field: &str, value: &str, max: usize) -> Result<String, DomainError> {
    if value.chars().count() > max {
        return Err(DomainError::OutOfRange(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(DomainError::Invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(value.to_owned())
}

/// An email address: one `@` with something on both sides, no spaces, at most 254 characters.
pub fn parse_email(field: &str, value: &str) -> Result<String, DomainError> {
    let email = value.trim();
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if valid {
        Ok(email.to_owned())
    } else {
        Err(DomainError::Invalid(format!(
            "{field} {value:?} is not a valid email address"
        )))
    }
}

/// An optional mark such as `receivedFrom`: blank means absent.
pub fn parse_mark(field: &str, value: Option<String>) -> Result<Option<String>, DomainError> {
    value
        .filter(|v| !v.trim().is_empty())
        .map(|v| parse_label(field, &v, MAX_LABEL_CHARS))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rules() {
        assert!(matches!(Text::parse(None), Err(DomainError::Missing(_))));
        assert!(matches!(
            Text::parse(Some(" \n".into())),
            Err(DomainError::Missing(_))
        ));
        assert!(Text::parse(Some("é".repeat(MAX_TEXT_CHARS))).is_ok());
        assert!(matches!(
            Text::parse(Some("a".repeat(MAX_TEXT_CHARS + 1))),
            Err(DomainError::OutOfRange(_))
        ));
    }

    #[test]
    fn agent_ref_rules() {
        assert_eq!(
            AgentRef::parse(Some("a1".into()), Some("x@y".into()), None).unwrap(),
            AgentRef::Id("a1".into())
        );
        assert_eq!(
            AgentRef::parse(None, Some(" Liz@Getwear.com ".into()), Some("Liz".into())).unwrap(),
            AgentRef::Email {
                email: "Liz@Getwear.com".into(),
                name: Some("Liz".into())
            }
        );
        assert!(
            matches!(AgentRef::parse(None, None, None), Err(DomainError::Missing(m)) if m.contains("agentId") && m.contains("agentEmail"))
        );
        assert!(matches!(
            AgentRef::parse(None, Some("nope".into()), None),
            Err(DomainError::Invalid(_))
        ));
    }

    #[test]
    fn visitor_id_rules() {
        assert!(VisitorId::parse(Some("kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg".into())).is_ok());
        assert!(matches!(
            VisitorId::parse(Some(String::new())),
            Err(DomainError::Missing(_))
        ));
        assert!(matches!(
            VisitorId::parse(Some("a\u{0}".into())),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            VisitorId::parse(Some("v".repeat(300))),
            Err(DomainError::OutOfRange(_))
        ));
    }
}
