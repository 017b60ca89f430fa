//! Which notices a reachable terminal takes: one rule for every binding, so a requester
//! gets the same answer (and, through [`RejectReason::describe`], the same words) from a
//! Linux host and from a device.

use crate::codes::RejectReason;
use crate::ident::{ServiceName, UserId};

/// Admits or rejects a notice from `from` for `wanted`, given the names of the services
/// this terminal offers and the requesters it allows (empty: anyone the relay lets
/// through). Returns the index of the service that serves it.
///
/// An empty service name means the one service when there is exactly one; with several
/// the requester must name one (`UnknownService`). A terminal that offers nothing is
/// `Busy`.
pub fn admit(
    from: &UserId,
    wanted: &ServiceName,
    services: &[&str],
    allow: &[&str],
) -> Result<usize, RejectReason> {
    if services.is_empty() {
        return Err(RejectReason::Busy);
    }
    if !allow.is_empty() && !allow.contains(&from.as_str()) {
        return Err(RejectReason::NotAllowed);
    }
    match (wanted.as_str(), services) {
        ("", [_]) => Ok(0),
        (name, _) => services
            .iter()
            .position(|s| *s == name)
            .ok_or(RejectReason::UnknownService),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        from: &str,
        wanted: &str,
        services: &[&str],
        allow: &[&str],
    ) -> Result<usize, RejectReason> {
        admit(
            &UserId::new(from).unwrap(),
            &ServiceName::new(wanted).unwrap(),
            services,
            allow,
        )
    }

    #[test]
    fn a_named_service_is_found_by_name() {
        assert_eq!(check("me", "http", &["ssh", "http"], &[]), Ok(1));
        assert_eq!(
            check("me", "ftp", &["ssh", "http"], &[]),
            Err(RejectReason::UnknownService)
        );
    }

    #[test]
    fn an_empty_name_means_the_only_service() {
        assert_eq!(check("me", "", &["ssh"], &[]), Ok(0));
        assert_eq!(
            check("me", "", &["ssh", "http"], &[]),
            Err(RejectReason::UnknownService)
        );
    }

    #[test]
    fn the_allow_list_comes_before_the_service() {
        assert_eq!(check("me", "ssh", &["ssh"], &["me", "you"]), Ok(0));
        assert_eq!(
            check("eve", "nope", &["ssh"], &["me"]),
            Err(RejectReason::NotAllowed)
        );
    }

    #[test]
    fn a_terminal_offering_nothing_is_busy() {
        assert_eq!(check("me", "ssh", &[], &["me"]), Err(RejectReason::Busy));
    }
}
