-- Exports leave out events of subjects under a GDPR restriction
-- (gdpr_restrictions) unless the requester may see them (README "GDPR:
-- erasure, restriction and legal holds"): the job remembers which.
ALTER TABLE export_jobs ADD COLUMN include_restricted boolean NOT NULL DEFAULT false;
