# caseroom_webhook: a small Redmine 5/6 plugin that sends issue events to caseroom, signed, in the same
# format as Redmine 7's native webhooks:
#   POST <url>  Content-Type: application/json
#   X-Redmine-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>
#   X-Caseroom-Delivery: redmine:issue:<id>:created | redmine:journal:<id>   (caseroom's catch-up poller
#                        uses the same ids, so an event arrives once whichever path delivers it first)
#   {"type":"issue.created|issue.updated","timestamp":…,"data":{"issue":{…},"journal":{…}}}
#
# Configure in Administration → Plugins → caseroom webhook (URL and secret), or with the environment
# variables CASEROOM_WEBHOOK_URL and CASEROOM_WEBHOOK_SECRET of the Redmine process. Deliveries run in a
# thread with short timeouts and are not retried: caseroom's poller catches what was lost.
require 'json'
require 'net/http'
require 'openssl'

Redmine::Plugin.register :caseroom_webhook do
  name 'caseroom webhook'
  author 'caseroom'
  description 'Sends signed issue events to caseroom (Redmine 7 native webhook format)'
  version '0.1.0'
  settings default: { 'url' => '', 'secret' => '' }, partial: 'settings/caseroom_webhook'
end

module CaseroomWebhook
  def self.config
    s = (Setting.plugin_caseroom_webhook rescue nil) || {}
    url = s['url'].presence || ENV['CASEROOM_WEBHOOK_URL']
    secret = s['secret'].presence || ENV['CASEROOM_WEBHOOK_SECRET']
    [url, secret]
  end

  def self.user_hash(user)
    return nil unless user
    { id: user.id, name: user.name, login: (user.respond_to?(:login) ? user.login : nil) }
  end

  def self.issue_hash(issue)
    {
      id: issue.id, subject: issue.subject, description: issue.description, is_private: issue.is_private,
      project: { id: issue.project_id, name: issue.project&.name, identifier: issue.project&.identifier },
      tracker: { id: issue.tracker_id, name: issue.tracker&.name },
      status: { id: issue.status_id, name: issue.status&.name, is_closed: issue.status&.is_closed? },
      priority: { id: issue.priority_id, name: issue.priority&.name },
      author: user_hash(issue.author), assigned_to: user_hash(issue.assigned_to),
      created_on: issue.created_on&.utc&.iso8601, updated_on: issue.updated_on&.utc&.iso8601
    }
  end

  def self.journal_hash(journal)
    {
      id: journal.id, notes: journal.notes, private_notes: journal.private_notes,
      created_on: journal.created_on&.utc&.iso8601, user: user_hash(journal.user),
      details: journal.details.map do |d|
        { property: d.property, prop_key: d.prop_key, old_value: d.old_value, value: d.value }
      end
    }
  end

  def self.deliver(type, issue, journal = nil)
    url, secret = config
    if url.blank?
      Rails.logger.debug('caseroom_webhook: no URL configured; nothing sent')
      return
    end
    base = "#{Setting.protocol}://#{Setting.host_name}"
    data = { issue: issue_hash(issue).merge(url: "#{base}/issues/#{issue.id}") }
    data[:journal] = journal_hash(journal) if journal
    body = { type: type, timestamp: Time.now.utc.iso8601, data: data }.to_json
    headers = {
      'Content-Type' => 'application/json', 'User-Agent' => 'Redmine caseroom_webhook',
      'X-Caseroom-Delivery' => journal ? "redmine:journal:#{journal.id}" : "redmine:issue:#{issue.id}:created"
    }
    headers['X-Redmine-Signature-256'] = "sha256=#{OpenSSL::HMAC.hexdigest('SHA256', secret, body)}" if secret.present?
    Thread.new do
      uri = URI(url)
      Net::HTTP.start(uri.host, uri.port, use_ssl: uri.scheme == 'https', open_timeout: 2, read_timeout: 5) do |http|
        http.post(uri.request_uri, body, headers)
      end
    rescue StandardError => e
      Rails.logger.warn("caseroom_webhook: delivery to #{url} failed: #{e.class}: #{e.message}")
    end
  end

  module IssuePatch
    def self.included(base)
      base.after_create_commit { CaseroomWebhook.deliver('issue.created', self) }
    end
  end

  module JournalPatch
    def self.included(base)
      base.after_create_commit { CaseroomWebhook.deliver('issue.updated', journalized, self) if journalized.is_a?(Issue) }
    end
  end
end

# Redmine 5 loads plugins after the application's prepare callbacks have run, so patch right away
# (production does not reload code); to_prepare covers development mode's reloading.
def caseroom_webhook_patch!
  Issue.include(CaseroomWebhook::IssuePatch) unless Issue.include?(CaseroomWebhook::IssuePatch)
  Journal.include(CaseroomWebhook::JournalPatch) unless Journal.include?(CaseroomWebhook::JournalPatch)
end
caseroom_webhook_patch!
Rails.configuration.to_prepare { caseroom_webhook_patch! }
Rails.logger.info("caseroom_webhook: hooked into issues and journals (URL #{CaseroomWebhook.config.first.presence || 'not set'})")
