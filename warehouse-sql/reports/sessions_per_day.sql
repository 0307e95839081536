-- Sessions per day and partner.
-- Parameters: start, end (YYYY-MM-DD, inclusive).
SELECT
  date,
  partner_id,
  COUNT(DISTINCT session_id) AS sessions
FROM events
WHERE date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
  AND session_id IS NOT NULL
GROUP BY date, partner_id
ORDER BY date, partner_id
