//! `queue_organizations` (of `[export]` and `[report]`): the organisations
//! that requests arriving through the queue (Redis stream, BullMQ) may
//! cover. Whoever can write to the queue is trusted with exactly these.

/// Checks a `queue_organizations` list: `["*"]` (every organisation) or a
/// list of organisation ids; the error says what is wrong.
pub fn check(list: &[String]) -> Result<(), &'static str> {
    if list.is_empty()
        || list.iter().any(|o| o.trim().is_empty())
        || (list.len() > 1 && list.iter().any(|o| o == "*"))
    {
        return Err("must be [\"*\"] (every organisation) or a list of organisation ids");
    }
    Ok(())
}

/// The organisations queue requests may cover: `None` for all (`["*"]`).
pub fn scope(list: &[String]) -> Option<Vec<String>> {
    (list != ["*"]).then(|| list.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_alone_means_every_organisation_and_lists_are_checked() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(scope(&l(&["*"])), None);
        assert_eq!(scope(&l(&["a", "b"])), Some(l(&["a", "b"])));
        assert!(check(&l(&["*"])).is_ok());
        assert!(check(&l(&["a"])).is_ok());
        for bad in [l(&[]), l(&["a", "*"]), l(&[" "])] {
            assert!(check(&bad).is_err(), "{bad:?}");
        }
    }
}
