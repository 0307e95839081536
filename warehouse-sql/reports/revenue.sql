-- Revenue per day and country: exact sums of purchase amounts.
-- Parameters: start, end (YYYY-MM-DD, inclusive).
SELECT
  date,
  country,
  COUNT(*) AS orders,
  SUM(cart_amount) AS revenue
FROM events
WHERE date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
  AND event = 'purchase'
GROUP BY date, country
ORDER BY date, country
