-- A released legal hold keeps no subject id in clear. On release the
-- worker replaces it by the subject's pseudonym ('pseud:' + HMAC-SHA256
-- with gdpr.pseudonym_key, the one an erasure gives) or, without a key, by
-- the commitment 'sha256:' + hex(SHA-256(hold id || ':' || subject)).
-- Holds released before this migration get the commitment now: the
-- database does not know the pseudonym key.
UPDATE legal_holds
   SET subject_id = 'sha256:' || encode(sha256(convert_to(id || ':' || subject_id, 'UTF8')), 'hex')
 WHERE released_at IS NOT NULL
   AND subject_id IS NOT NULL
   AND subject_id !~ '^(pseud|sha256):[0-9a-f]{64}$';
