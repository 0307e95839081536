-- Daily active people per partner: distinct people per day. An event counts for its user id;
-- an event with only an anonymous id counts for the person that device was merged into
-- (table identities: the speed layer's merges, less the devices an operator unlinked since),
-- else for the device itself. So a visitor who browsed anonymously and then logged in is one
-- person, not two.
-- Parameters: start, end (YYYY-MM-DD, inclusive).
SELECT
  e.date,
  e.partner_id,
  COUNT(DISTINCT COALESCE(e.user_id, link.user_id, e.anonymous_id)) AS active_people
FROM events AS e
LEFT JOIN (
  SELECT partner_id, anonymous_id, MIN(user_id) AS user_id
  FROM identities
  GROUP BY partner_id, anonymous_id
  HAVING SUM(CASE WHEN kind = 'unlink' THEN 1 ELSE 0 END) = 0
) AS link
  ON link.partner_id = e.partner_id AND link.anonymous_id = e.anonymous_id
WHERE e.date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
GROUP BY e.date, e.partner_id
ORDER BY e.date, e.partner_id
