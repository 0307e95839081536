-- Top categories per partner over a date range: events and distinct people per category.
-- An event's category list is a path (breadcrumb), shown as "a > b"; events without one are
-- left out. Parameters: start, end (YYYY-MM-DD, inclusive).
SELECT
  partner_id,
  ARRAY_TO_STRING(category, ' > ') AS category_path,
  COUNT(*) AS events,
  COUNT(DISTINCT COALESCE(user_id, anonymous_id)) AS people
FROM events
WHERE date BETWEEN DATE '{{start}}' AND DATE '{{end}}'
  AND ARRAY_LENGTH(category) > 0
GROUP BY partner_id, category_path
ORDER BY partner_id, events DESC, category_path
