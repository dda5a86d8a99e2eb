-- The notification a message names, with its template and its recipient. $1 notification id.
SELECT m.payload, m.created_at,
       t.id AS template_id, t.name AS template_name, t.title_template, t.body_template,
       u.id AS user_id, u.username, u.email
FROM notification_messages m
JOIN notification_templates t ON t.id = m.notification_template_id
JOIN users u ON u.id = m.user_id
WHERE m.id = $1
