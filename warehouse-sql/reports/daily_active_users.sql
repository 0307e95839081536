-- Daily active users per partner: distinct people (user id, else anonymous id) per day.
-- Parameters: start, end (YYYY-MM-DD, inclusive).
SELECT
  date,
  partner_id,
  COUNT(DISTINCT COALESCE(user_id, anonymous_id)) AS active_users
FROM events
WHERE date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
GROUP BY date, partner_id
ORDER BY date, partner_id
